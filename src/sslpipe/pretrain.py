"""The pretrain stage: one method, one seed, data resident on the device.

The whole training set lives on the device as one uint8 tensor (N x 3 x H x W); each step
indexes a batch there and the method augments it on the device. The loss is accumulated on
the device and read back only every `log_every` steps, so the host never waits on every step.

Resuming. With a checkpoint path, training writes everything it needs to go on exactly where
it stopped (the method's state_dict: model, heads and buffers such as MoCo's queue, PIRL's
memory bank and CD's replay buffer; the optimizer state; the step counters; the history; the
epoch's permutation and partial loss sums; every RNG state) every `pretrain.checkpoint_every`
epochs, and also mid-epoch when SIGTERM or SIGUSR1 arrives (what SLURM sends before it kills
or requeues a job): the current step finishes, the checkpoint is written, and the process
exits with an error that says to rerun. A rerun with the same config, data and training code
resumes from it automatically and, on the CPU, ends bit-identical to an uninterrupted run (on
CUDA as close as two uninterrupted runs are: some kernels are not deterministic); a checkpoint
written for anything else is ignored with a message. The checkpoint is deleted once the final
outputs exist; it is kept when the loss becomes non-finite.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sslpipe import data as data_mod
from sslpipe.io import atomic_path, read_json, write_json, write_text
from sslpipe.methods import METHODS
from sslpipe.methods.cd import EnergyError
from sslpipe.models import TrainingError, build_encoder, pick_device, pick_dtype

LogFn = Callable[[dict, int | None], None]

CHECKPOINT_FORMAT = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM: SIGTERM before the kill; USR1 via --signal
# The code whose change makes a checkpoint stale: resuming across a fix to a method or to the
# loop would give numbers that neither version produces.
TRAINING_CODE = ("pretrain.py", "models.py", "augment.py", "methods")
# Keys that do not change what training computes; a checkpoint stays valid across them.
NEUTRAL_PRETRAIN_KEYS = ("checkpoint_every",)


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was written and a rerun resumes from it."""


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to zero (SimCLR's schedule, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params, cfg: dict, device: torch.device) -> torch.optim.Optimizer:
    # Fused kernels on CUDA; foreach (one kernel per op over all tensors) elsewhere.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], **fast)
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], **fast)


def load_train_tensor(data_dir: Path, device: torch.device, channels_last: bool) -> torch.Tensor:
    x, _ = data_mod.load_split(data_dir, "train")  # labels are never read by pretraining
    t = torch.from_numpy(x).permute(0, 3, 1, 2)     # N x H x W x 3 -> N x 3 x H x W (uint8)
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()
    return t.to(device)


# ---- training state, checkpoints and RNG states ----------------------------------------------

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
                amp_dtype: torch.dtype | None) -> str:
    """What a checkpoint is valid for: the settings training reads, the data, the code."""
    pretrain = {k: v for k, v in cfg["pretrain"].items() if k not in NEUTRAL_PRETRAIN_KEYS}
    settings = {"format": CHECKPOINT_FORMAT, "method": method_name, "seed": seed, "pretrain": pretrain,
                "model": cfg["model"], "method_cfg": cfg[method_name], "policy": policy,
                "channels_last": cfg["channels_last"], "device": device.type, "precision": str(amp_dtype),
                "data_sha256": manifest["sha256"], "torch": torch.__version__, "code": code_hash()}
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
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
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
        set_rng_state(state["rng"], self.device)
        self.last = state["where"]
        return Progress.from_state(state["progress"], self.device)

    def save(self, method: torch.nn.Module, opt: torch.optim.Optimizer, st: Progress, where: str) -> None:
        """Atomically: a kill mid-write leaves the previous checkpoint intact."""
        state = {"format": CHECKPOINT_FORMAT, "fingerprint": self.fp, "where": where, "method": method.state_dict(),
                 "optimizer": opt.state_dict(), "rng": rng_state(self.device), "progress": st.to_state()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
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


# ---- the training loop -----------------------------------------------------------------------

def echo_line(line: str) -> None:
    print(line, flush=True)  # the job's log shows progress as it happens, and survives a SIGKILL


def run(cfg: dict, method_name: str, seed: int, data_dir: str | Path, policy_path: str | Path,
        out_dir: str | Path, log: LogFn = lambda m, s=None: None, echo: Callable[[str], None] = echo_line,
        checkpoint: str | Path | None = None) -> dict:
    """Pretrain `method_name` and write encoder.pt and history.csv to out_dir (the stage adds summary.json).

    With `checkpoint` (a path outside the stage's declared outputs), training resumes from it
    when it matches this run, writes it every `pretrain.checkpoint_every` epochs and on
    SIGTERM/SIGUSR1 (then raises `Preempted`), and deletes it once the outputs are written.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tcfg = cfg["pretrain"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    device = pick_device(cfg["device"])
    amp_dtype = pick_dtype(cfg["precision"], device)
    manifest = data_mod.load_manifest(data_dir)
    policy = read_json(policy_path)
    x = load_train_tensor(data_dir, device, cfg["channels_last"])
    n, b = len(x), tcfg["batch_size"]
    if b > n:
        raise TrainingError(f"config key 'pretrain.batch_size' = {b} is larger than the training set "
                            f"({n} images in {data_dir}): lower pretrain.batch_size.")

    encoder = build_encoder(cfg["model"], manifest)
    method = METHODS[method_name](encoder, cfg[method_name], policy, n).to(device)
    if cfg["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if tcfg["compile"]:
        encoder.backbone.compile()  # in place: state_dict keys stay those of the plain module
    opt = make_optimizer([p for p in method.parameters() if p.requires_grad], tcfg, device)

    echo(f"pretrain {method_name} seed={seed}: {n} images, batch {b}, {tcfg['epochs']} epochs, device {device}, "
         f"precision {amp_dtype or 'fp32'}, backbone {cfg['model']['backbone']}")
    ckpt = Checkpoint(Path(checkpoint) if checkpoint else None,
                      fingerprint(cfg, method_name, seed, manifest, policy, device, amp_dtype),
                      tcfg.get("checkpoint_every", 1), device)
    st = ckpt.load(method, opt, echo)
    resumed_at = None if st is None else st.step
    if st is None:
        st = Progress()
    else:
        echo(f"resuming from {ckpt.path}: {ckpt.last}")
        for row in st.history:  # this job's tracking run gets the whole curve, not only the rest
            log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

    loop = Loop(method, opt, x, tcfg, device, amp_dtype, method_name, ckpt, log, echo)
    try:
        loop.run(st)
    except (TrainingError, EnergyError) as exc:  # non-finite: keep the last good checkpoint, say where
        raise type(exc)(f"{exc} {ckpt.note()}") from exc

    method.eval()
    diagnostics = {}
    if hasattr(method, "diagnostics"):
        torch.manual_seed(seed)  # diagnostics draw noise too: make them repeatable on their own
        diagnostics = method.diagnostics(x[: min(n, 256)], out_dir) or {}
        if diagnostics:
            log(diagnostics, tcfg["epochs"])
    save_encoder(encoder, out_dir / "encoder.pt")
    write_text(out_dir / "history.csv", history_csv(st.history))
    ckpt.delete()  # the outputs now hold all that the checkpoint was kept for
    wall = time.perf_counter() - loop.t_start
    summary = {"method": method_name, "seed": seed, "device": str(device), "precision": str(amp_dtype or "fp32"),
               "epochs": tcfg["epochs"], "steps": st.step, "wall_time_s": wall,
               "images_per_s": st.step * b / wall, "final_loss": st.history[-1]["loss"], "diagnostics": diagnostics,
               "resumed_at_step": resumed_at}
    return summary


@dataclass
class Loop:
    """The epochs of one run; `run` advances a Progress in place and checkpoints as it goes."""
    method: torch.nn.Module
    opt: torch.optim.Optimizer
    x: torch.Tensor
    tcfg: dict
    device: torch.device
    amp_dtype: torch.dtype | None
    name: str
    ckpt: Checkpoint
    log: LogFn
    echo: Callable[[str], None]
    t_start: float = 0.0

    def __post_init__(self) -> None:
        n, b = len(self.x), self.tcfg["batch_size"]
        self.steps_per_epoch = n // b  # drop the last partial batch: contrastive losses want full batches
        self.total = self.steps_per_epoch * self.tcfg["epochs"]
        self.warmup = self.tcfg["warmup_epochs"] * self.steps_per_epoch

    def lr(self, step: int) -> float:
        return lr_at(step, self.total, self.warmup, self.tcfg["lr"])

    def run(self, st: Progress) -> None:
        epochs = self.tcfg["epochs"]
        self.t_start = time.perf_counter() - st.train_s  # the clock goes on from the checkpoint's
        with StopSignals(enabled=self.ckpt.path is not None) as stop:
            while st.epoch <= epochs:
                self.method.train()
                t0 = time.perf_counter() - st.epoch_s
                if st.order is None:  # a fresh epoch; a resumed one keeps its permutation and partial sums
                    st.order = torch.randperm(len(self.x), device=self.device)
                    st.loss_sum, st.extra_sum = torch.zeros((), device=self.device), {}
                while st.step_in_epoch < self.steps_per_epoch:
                    self.step(st)
                    if stop.received and st.step_in_epoch < self.steps_per_epoch:
                        st.epoch_s = time.perf_counter() - t0
                        self.preempt(st, stop)
                self.finish_epoch(st, t0)
                if stop.received and st.epoch <= epochs:
                    self.preempt(st, stop)
                # Also after the last epoch: a kill while the outputs are written then costs no epoch.
                if self.ckpt.due(st.epoch - 1):
                    self.save(st)

    def step(self, st: Progress) -> None:
        b = self.tcfg["batch_size"]
        for group in self.opt.param_groups:
            group["lr"] = self.lr(st.step)
        idx = st.order[st.step_in_epoch * b:(st.step_in_epoch + 1) * b]
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, logs = self.method.loss(self.x[idx], idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.method.after_step()
        st.loss_sum += loss.detach().float()
        for k, v in logs.items():
            st.extra_sum[k] = st.extra_sum.get(k, 0) + v.detach().float()
        st.step += 1
        st.step_in_epoch += 1
        if st.step % self.tcfg["log_every"] == 0 and not torch.isfinite(st.loss_sum):
            raise TrainingError(non_finite_message(self.name, st.epoch, st.step))

    def finish_epoch(self, st: Progress, t0: float) -> None:
        """Close the epoch in progress: its history row (one host sync), then move `st` to the next."""
        mean_loss = (st.loss_sum / self.steps_per_epoch).item()
        if not math.isfinite(mean_loss):
            raise TrainingError(non_finite_message(self.name, st.epoch, st.step))
        lr, dt = self.lr(st.step - 1), time.perf_counter() - t0
        row = {"epoch": st.epoch, "loss": mean_loss, "lr": lr,
               "images_per_s": self.steps_per_epoch * self.tcfg["batch_size"] / dt,
               "wall_s": time.perf_counter() - self.t_start}
        row.update({k: (v / self.steps_per_epoch).item() for k, v in st.extra_sum.items()})
        st.history.append(row)
        self.log({k: v for k, v in row.items() if k != "epoch"}, st.epoch)
        self.echo(f"epoch {st.epoch}/{self.tcfg['epochs']} loss {mean_loss:.4f} lr {lr:.2e} "
                  f"{row['images_per_s']:.0f} img/s")
        st.epoch, st.step_in_epoch, st.order, st.epoch_s = st.epoch + 1, 0, None, 0.0
        st.loss_sum, st.extra_sum = None, {}

    def save(self, st: Progress) -> None:
        st.train_s = time.perf_counter() - self.t_start
        self.ckpt.save(self.method, self.opt, st, st.where(self.steps_per_epoch, self.tcfg["epochs"]))

    def preempt(self, st: Progress, stop: StopSignals) -> None:
        """Write the checkpoint for where `st` stands and raise Preempted."""
        if st.loss_sum is not None and not torch.isfinite(st.loss_sum):  # never save a diverged state
            raise TrainingError(non_finite_message(self.name, st.epoch, st.step))
        self.save(st)
        raise Preempted(f"{self.name}: preempted by {stop.name} at {self.ckpt.last}; checkpoint written to "
                        f"{self.ckpt.path}; rerun to resume (the same command, or snakemake again).")


def non_finite_message(method: str, epoch: int, step: int) -> str:
    return (f"{method}: the loss became non-finite at epoch {epoch} (step {step}). Lower pretrain.lr, "
            "or use precision: fp32; for cd, lower cd.step_size or raise cd.alpha.")


def save_encoder(encoder: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def history_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_summary(out_dir: Path, summary: dict) -> None:
    write_json(out_dir / "summary.json", summary)
