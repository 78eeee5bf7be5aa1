"""Self-supervised methods, one file each, behind one small interface (`methods.base.Method`:
`name`, `policy`, `preview`, `loss`, and the optional hooks `after_step`, `global_bn`,
`diagnostics`, `divergence_hint`, `objective`).

`METHODS` maps each method's `name` to its class: the methods the pipeline pretrains (the
schema's `methods` enum). The supervised baseline has the same shape but is no SSL method:
it lives in `sslpipe.supervised` and is trained inside its evaluation job.
"""
from __future__ import annotations

from sslpipe.methods.cd import CD
from sslpipe.methods.dae import DAE
from sslpipe.methods.moco import MoCo
from sslpipe.methods.pirl import PIRL
from sslpipe.methods.simclr import SimCLR

METHODS: dict[str, type] = {cls.name: cls for cls in (SimCLR, MoCo, PIRL, DAE, CD)}
