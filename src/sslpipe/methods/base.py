"""The interface between a method and the training loop (`pretrain.Loop`), written down once.

A method is an `nn.Module` class with the members of `Method` below (required) and any of the
optional hooks (`after_step`, `global_bn`, `diagnostics`, `divergence_hint`, `objective`); the
loop and the stages read the optional ones through the functions here, so a method that needs
none of them defines none (no empty `after_step`). `encoder.feat_dim` features (before any head) are what
evaluation uses. `__init__(encoder, cfg, policy, num_train)` builds an SSL method (`METHODS`):
`encoder` is a `models.Encoder`, `cfg` the method's config section; the method owns its heads
and state (queues, memory banks, replay buffers) as submodules/buffers, so `state_dict()` holds
everything needed to resume. The supervised baseline (`sslpipe.supervised.Supervised`) has the
same shape, with the labels as its state, and is trained by the same loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Method(Protocol):
    """What every method has; the loop and the augment stage call these.

    - `name`: its key in `METHODS` (and in the config, results paths and MLflow tags).
    - `policy(cfg, image_size) -> dict` (static): the resolved view policy, JSON-able. The
      augment stage writes it to `policy.json`; pretraining reads it back, so training uses
      exactly the validated policy.
    - `preview(policy, x) -> list[Tensor]` (static): the views the method trains on for a float
      batch x (N x 3 x H x W in [0, 1]), each N x 3 x H x W in [0, 1], for the preview grid.
    - `loss(x, idx) -> (loss, logs)`: x is a uint8 batch N x 3 x H x W on the training device
      (this rank's rows of the global batch under DDP), idx its indices into the training set
      (for memory banks, labels); loss a 0-d tensor, logs maps names to 0-d tensors, summed on
      the device and averaged per epoch into history.csv (read back only every few steps).
    """

    name: ClassVar[str]

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict: ...

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]: ...

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...


# ---- the optional hooks, with their defaults ---------------------------------------------------

def after_step(method: nn.Module) -> None:
    """`method.after_step()` if it has one: updates that follow the optimizer step (MoCo's momentum
    encoder and queue); by default nothing."""
    hook = getattr(method, "after_step", None)
    if hook is not None:
        hook()


def global_bn(method: nn.Module) -> bool:
    """`method.global_bn` (default True): under DDP every BatchNorm normalises over the global
    batch, as the single-process run's does; False when the method normalises per group on
    purpose (MoCo's shuffling BN)."""
    return getattr(method, "global_bn", True)


def has_diagnostics(method: nn.Module) -> bool:
    """Whether `method.diagnostics(x, out_dir) -> dict[str, float]` exists: method-specific
    figures written into out_dir (PNG) and scalar metrics, run once after training (eval mode)."""
    return callable(getattr(method, "diagnostics", None))


def diagnostics(method: nn.Module, x: Tensor, out_dir: str | Path) -> dict[str, float]:
    return (method.diagnostics(x, out_dir) or {}) if has_diagnostics(method) else {}


def divergence_hint(method: nn.Module) -> str:
    """`method.divergence_hint`: the method's own keys to change when its loss becomes
    non-finite, appended to the loop's message (default: none beyond the shared ones)."""
    return getattr(method, "divergence_hint", "")


def objective(method: nn.Module) -> str | None:
    """`method.objective`: its loss in words, for methods whose config chooses between objectives
    (CD's and DAE's `objective`); pretraining writes it into summary.json and the report shows it.
    Default None."""
    return getattr(method, "objective", None)
