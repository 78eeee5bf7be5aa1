"""Self-supervised methods, one file each, behind one small interface.

Every method is an `nn.Module` class with:

- `name: str`
- `policy(cfg, image_size) -> dict` (static): the resolved view policy, JSON-able. `cfg` is
  the method's config section. The augment stage writes it to `policy.json`; pretraining
  reads it back, so training uses exactly the validated policy.
- `preview(policy, x) -> list[Tensor]` (static): the views the method trains on for a float
  batch x (N x 3 x H x W in [0, 1]), each N x 3 x H x W in [0, 1], for the preview grid.
- `__init__(encoder, cfg, policy, num_train)`: `encoder` is a `models.Encoder`; the method
  owns its heads and state (queues, memory banks, replay buffers) as submodules/buffers, so
  `state_dict()` holds everything needed to resume.
- `loss(x, idx) -> (loss, logs)`: x is a uint8 batch N x 3 x H x W on the training device,
  idx its indices into the training set (for memory banks); logs maps names to 0-d tensors
  (read back to the host only every few steps).
- `after_step()`: updates that follow the optimizer step (momentum encoders, queues);
  may be a no-op.
- `diagnostics(x, out_dir) -> dict[str, float]` (optional): method-specific figures written
  into `out_dir` (PNG) and scalar metrics, run once after training.

`encoder.feat_dim` features (before any head) are what evaluation uses.
"""
from __future__ import annotations

from sslpipe.methods.cd import CD
from sslpipe.methods.dae import DAE
from sslpipe.methods.moco import MoCo
from sslpipe.methods.pirl import PIRL
from sslpipe.methods.simclr import SimCLR

METHODS: dict[str, type] = {
    "simclr": SimCLR,
    "moco": MoCo,
    "pirl": PIRL,
    "dae": DAE,
    "cd": CD,
}
