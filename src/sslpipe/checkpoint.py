"""Exact resume for pretraining: what a checkpoint holds, when it is valid, stop signals.

A checkpoint holds the method's state_dict (model, heads, buffers such as MoCo's queue, PIRL's
memory bank, CD's replay buffer), the optimizer state, the step counters, the history, the
epoch's permutation and partial loss sums, and every RNG state, as tensors and plain values so
that `torch.load(..., weights_only=True)` reads it. It is valid only for the settings, data and
training code it was written with (`fingerprint`), including the number of processes.

Under DDP (distributed.py) rank 0 writes the checkpoint, holding every rank's RNG state
(`rng_ranks`; every other part of the state is the same on all ranks, or, for MoCo's per-rank
BatchNorm running statistics, never reaches rank 0's results), and every rank loads it.
"""
from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sslpipe import distributed as ddp
from sslpipe.io import atomic_path

CHECKPOINT_FORMAT = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM: SIGTERM before the kill; USR1 via --signal
# The code whose change makes a checkpoint stale: resuming across a fix to a method or to the
# loop would give numbers that neither version produces.
TRAINING_CODE = ("pretrain.py", "checkpoint.py", "models.py", "augment.py", "methods", "supervised.py")
# Keys that do not change what training computes; a checkpoint stays valid across them.
NEUTRAL_PRETRAIN_KEYS = ("checkpoint_every",)


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was written and a rerun resumes from it."""


@dataclass
class Progress:
    """Where training stands; all of it goes into the checkpoint.

    `epoch` is the epoch in progress (1-based; epochs + 1 once training is done) and
    `step_in_epoch` the steps of it already taken; `order` is its permutation (None until it
    is drawn); `loss_sum`/`extra_sum` its partial sums on the device; `epoch_s`/`train_s` the
    seconds spent in it / in training so far, across processes.
    """
    epoch: int = 1
    step_in_epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    extra_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch_s: float = 0.0
    train_s: float = 0.0
    history: list[dict] = field(default_factory=list)

    def where(self, steps_per_epoch: int, epochs: int) -> str:
        if self.epoch > epochs:
            return f"the end of training (after step {self.step})"
        inside = f"{self.step_in_epoch}/{steps_per_epoch} steps into it" if self.step_in_epoch else "its start"
        return f"epoch {self.epoch} after step {self.step} ({inside})"

    def to_state(self) -> dict:
        return dict(vars(self))  # tensors, ints, floats, and rows of floats: all weights_only-safe

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Progress:
        def to_dev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return cls(**{**state, "order": to_dev(state["order"]), "loss_sum": to_dev(state["loss_sum"]),
                      "extra_sum": {k: to_dev(v) for k, v in state["extra_sum"].items()},
                      "history": list(state["history"])})


def fingerprint(cfg: dict, method_name: str, seed: int, manifest: dict, policy: dict, device: torch.device,
                amp_dtype: torch.dtype | None, world: int = 1, method_cfg: dict | None = None) -> str:
    """What a checkpoint is valid for: the settings training reads, the data, the code.
    `method_cfg`: the method's own settings, for a method without a config section of its own
    (the supervised baseline); an SSL method's are cfg[method_name]."""
    pretrain = {k: v for k, v in cfg["pretrain"].items() if k not in NEUTRAL_PRETRAIN_KEYS}
    settings = {"format": CHECKPOINT_FORMAT, "method": method_name, "seed": seed, "pretrain": pretrain,
                "model": cfg["model"], "method_cfg": cfg[method_name] if method_cfg is None else method_cfg, "policy": policy,
                "channels_last": cfg["channels_last"], "device": device.type, "precision": str(amp_dtype),
                "data_sha256": manifest["sha256"], "torch": torch.__version__, "code": code_hash(), "world": world}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def code_hash() -> str:
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in TRAINING_CODE:
        for path in sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name]:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def rng_state(device: torch.device) -> dict:
    """Every RNG state as tensors and plain values, so `torch.load(weights_only=True)` reads it."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # This process's GPU only (cuda:LOCAL_RANK under torchrun, set by distributed.init): the
        # others are other ranks' (their states are in their own entries of `rng_ranks`), and
        # get_rng_state_all() would open a CUDA context on every visible GPU.
        "cuda": [torch.cuda.get_rng_state()] if device.type == "cuda" else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0])  # the current device's: see rng_state
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


@dataclass
class Checkpoint:
    """The resume checkpoint of one run at `path` (None: no checkpoints), valid for `fp` only."""
    path: Path | None
    fp: str
    every: int
    device: torch.device
    last: str | None = None  # where the last checkpoint this run wrote or resumed from stands

    def load(self, method: torch.nn.Module, opt: torch.optim.Optimizer, echo: Callable[[str], None]) -> Progress | None:
        """Restore model, buffers, optimizer and RNG from the checkpoint if it is one for this run."""
        if self.path is None:
            return None
        # A SIGKILL during a write leaves atomic_path's temporary behind; the directory is this run's.
        for stale in self.path.parent.glob(f".{self.path.stem}.*.tmp{self.path.suffix}"):
            stale.unlink(missing_ok=True)
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable (e.g. another torch's format): start over, and say why
            echo(f"ignoring checkpoint {self.path}: it cannot be read ({exc}); training starts from scratch "
                 "and overwrites it.")
            return None
        if state.get("fingerprint") != self.fp:
            echo(f"ignoring checkpoint {self.path}: it was written for a different config, dataset or training "
                 "code; training starts from scratch and overwrites it.")
            return None
        method.load_state_dict(state["method"])  # copies into the existing tensors (device, layout)
        opt.load_state_dict(state["optimizer"])
        # Last, so that nothing drawn while the model was built shifts the restored streams.
        set_rng_state(state["rng_ranks"][ddp.rank()] if "rng_ranks" in state else state["rng"], self.device)
        self.last = state["where"]
        return Progress.from_state(state["progress"], self.device)

    def save(self, method: torch.nn.Module, opt: torch.optim.Optimizer, st: Progress, where: str) -> None:
        """Atomically: a kill mid-write leaves the previous checkpoint intact. Under DDP every
        rank calls this (it gathers the RNG states, and returns once the file is written)."""
        rng = rng_state(self.device)
        state = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fp, "where": where, "method": method.state_dict(),
                 "optimizer": opt.state_dict(), "rng": rng, "progress": st.to_state()}
        if ddp.world() > 1:
            state["rng_ranks"] = ddp.gather_objects(rng)
        if ddp.is_main():
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        ddp.barrier()  # no rank exits (Preempted) before the file is there
        self.last = where

    def due(self, epochs_done: int) -> bool:
        return self.path is not None and epochs_done % self.every == 0

    def delete(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def note(self) -> str:
        """For error messages: what is kept, and what a rerun does with it."""
        if self.path is None:
            return ""
        if self.last is None:
            return "No checkpoint of this run was written before this."
        return (f"The last good checkpoint, at {self.last}, is kept at {self.path}; a rerun with the same "
                "settings resumes from it, a changed config starts from scratch.")


class StopSignals:
    """While active, SIGTERM/SIGUSR1 only set `received` (the loop stops after the current step).

    Python runs handlers in the main thread only, so elsewhere (or when disabled) nothing is
    installed and the signals keep their default action.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum  # nothing else here: the handler interrupts arbitrary code

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
