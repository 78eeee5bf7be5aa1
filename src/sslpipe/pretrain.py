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

Several processes (DDP, `torchrun --nproc_per_node N`; see distributed.py). Every rank holds
the whole training set and draws the same permutation (rank 0's, broadcast); rank r trains on
its B/N rows of each global batch of B, gradients are averaged after backward, and BatchNorm
normalises over the global batch (except MoCo, whose shuffling BN spans the ranks itself), so
one step computes what a single process computes at batch B (tests/test_ddp.py). Augmentation
streams differ per rank (each is seeded from (seed, rank)), so the ranks' views are independent.
Only rank 0 echoes, logs, writes the outputs and the checkpoint (with every rank's RNG state);
all ranks resume from it. The logged loss is the mean over the global batch.
"""
from __future__ import annotations

import csv
import io
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sslpipe import data as data_mod
from sslpipe import distributed as ddp
from sslpipe import progress
from sslpipe.config import train_settings
from sslpipe.checkpoint import Checkpoint, Preempted, Progress, StopSignals, fingerprint
from sslpipe.io import atomic_path, read_json, write_json, write_text
from sslpipe.methods import METHODS, base
from sslpipe.models import DivergedError, Encoder, TrainingError, build_encoder, pick_device, pick_dtype

LogFn = Callable[[dict, int | None], None]


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


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_method(cfg: dict, method_name: str, policy: dict, manifest: dict, n: int,
                 device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(encoder, method) of the SSL method `method_name` on `device`, ready to train."""
    encoder = build_encoder(cfg["model"], manifest)
    return encoder, place(cfg, METHODS[method_name](encoder, cfg[method_name], policy, n), encoder, device)


def place(cfg: dict, method: torch.nn.Module, encoder: Encoder, device: torch.device) -> torch.nn.Module:
    """`method` (built around `encoder`) on `device`, ready to train.

    Under DDP every BatchNorm normalises over the global batch, as the single-process run's
    does, unless the method normalises per group on purpose (`base.global_bn`: MoCo's
    shuffling BN); and every rank starts from rank 0's parameters and buffers.
    """
    method = method.to(device)
    if cfg["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    if base.global_bn(method):
        ddp.sync_batchnorm(method, device)  # children replaced in place: `encoder` is converted too
    ddp.broadcast_state(method)
    if cfg["pretrain"]["compile"]:
        encoder.backbone.compile()  # in place: state_dict keys stay those of the plain module
    return method


def check_batch_size(b: int, n: int, data_dir: Path) -> None:
    world = ddp.world()
    if b > n:
        raise TrainingError(f"config key 'pretrain.batch_size' = {b} is larger than the training set "
                            f"({n} images in {data_dir}): lower pretrain.batch_size.")
    if b % world:
        raise TrainingError(f"config key 'pretrain.batch_size' = {b} is not divisible by the {world} processes: "
                            "each process takes an equal share of every batch; change pretrain.batch_size or "
                            "pretrain.processes.")


def load_train_tensor(data_dir: Path, device: torch.device, channels_last: bool) -> torch.Tensor:
    x, _ = data_mod.load_split(data_dir, "train")  # labels are never read by pretraining
    t = torch.from_numpy(x).permute(0, 3, 1, 2)     # N x H x W x 3 -> N x 3 x H x W (uint8)
    t = t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()
    if device.type == "cuda":  # page-locked, so the one host-to-device copy is a DMA that need not block
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---- the training loop -----------------------------------------------------------------------

def echo_line(line: str) -> None:
    progress.say(line)  # flushed: the log shows it as it happens; on a terminal, epochs behind a bar


def run(cfg: dict, method_name: str, seed: int, data_dir: str | Path, policy_path: str | Path,
        out_dir: str | Path, log: LogFn = lambda m, s=None: None, echo: Callable[[str], None] = echo_line,
        checkpoint: str | Path | None = None) -> dict:
    """Pretrain `method_name` and write encoder.pt and history.csv to out_dir (the stage adds summary.json).

    With `checkpoint` (a path outside the stage's declared outputs), training resumes from it
    when it matches this run, writes it every `pretrain.checkpoint_every` epochs and on
    SIGTERM/SIGUSR1 (then raises `Preempted`), and deletes it once the outputs are written.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tcfg = train_settings(cfg, method_name)  # the shared pretrain section + the method's own keys
    seed_everything(seed)
    world, main = ddp.world(), ddp.is_main()
    if not main:  # rank 0 speaks for all
        log, echo = (lambda m, s=None: None), (lambda line: None)
    device = pick_device(cfg["device"])
    if device.type == "cuda":  # fixed input shapes every step: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    amp_dtype = pick_dtype(cfg["precision"], device)
    manifest = data_mod.load_manifest(data_dir)
    policy = read_json(policy_path)
    x = load_train_tensor(data_dir, device, cfg["channels_last"])
    n, b = len(x), tcfg["batch_size"]
    check_batch_size(b, n, data_dir)
    encoder, method = build_method(cfg, method_name, policy, manifest, n, device)
    ckpt = Checkpoint(Path(checkpoint) if checkpoint else None,
                      fingerprint(cfg, method_name, seed, manifest, policy, device, amp_dtype, world),
                      tcfg["checkpoint_every"], device)
    monitor = knn_monitor(cfg, encoder, x, data_dir, device, seed) if main else None
    st, t_start, resumed_at = fit(cfg, tcfg, method, method_name, x, seed, device, amp_dtype, ckpt, log, echo,
                                  f"pretrain {method_name}", monitor)

    diagnostics = {}
    if main and base.has_diagnostics(method):  # eval mode: no collectives, rank 0 alone is fine
        torch.manual_seed(seed)  # diagnostics draw noise too: make them repeatable on their own
        diagnostics = base.diagnostics(method, x[: min(n, 256)], out_dir)
        if diagnostics:
            log(diagnostics, tcfg["epochs"])
    if main:  # every rank holds the same encoder; one writes it
        save_encoder(encoder, out_dir / "encoder.pt")
        write_text(out_dir / "history.csv", history_csv(st.history))
        ckpt.delete()  # the outputs now hold all that the checkpoint was kept for
    wall = time.perf_counter() - t_start
    summary = {"method": method_name, "seed": seed, "device": str(device), "precision": str(amp_dtype or "fp32"),
               "epochs": tcfg["epochs"], "steps": st.step, "wall_time_s": wall,
               "images_per_s": st.step * b / wall, "final_loss": st.history[-1]["loss"], "diagnostics": diagnostics,
               "resumed_at_step": resumed_at, "processes": world, "objective": base.objective(method)}
    return summary


def fit(cfg: dict, tcfg: dict, method: torch.nn.Module, name: str, x: torch.Tensor, seed: int,
        device: torch.device, amp_dtype: torch.dtype | None, ckpt: Checkpoint, log: LogFn,
        echo: Callable[[str], None], title: str, monitor: tuple[int, Callable[[], float]] | None = None
        ) -> tuple[Progress, float, int | None]:
    """Train `method` (placed on `device` by `place`, seeded by `seed_everything(seed)`) on the
    uint8 images `x` with the settings `tcfg`: resumed from `ckpt` when it holds this run, by
    `Loop`, then left in eval mode; `title` starts the header line. Returns the final Progress, the training clock's start
    (perf_counter) and the step the run resumed from (None for a fresh one)."""
    world, n, b = ddp.world(), len(x), tcfg["batch_size"]
    if ddp.rank() > 0:  # independent augmentation streams per rank; rank 0 keeps the single-process one
        seed_everything(int(np.random.SeedSequence([seed, ddp.rank()]).generate_state(1)[0]))
    opt = make_optimizer([p for p in method.parameters() if p.requires_grad], tcfg, device)
    echo(f"{title} seed={seed}: {n} images, batch {b}, {tcfg['epochs']} epochs, device {device}, "
         f"precision {amp_dtype or 'fp32'}, backbone {cfg['model']['backbone']}"
         + (f", {world} processes (batch {b // world} each)" if world > 1 else ""))
    st = ckpt.load(method, opt, echo)
    resumed_at = None if st is None else st.step
    if st is None:
        st = Progress()
    else:
        echo(f"resuming from {ckpt.path}: {ckpt.last}")
        for row in st.history:  # this job's tracking run gets the whole curve, not only the rest
            log({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])
    loop = Loop(method, opt, x, tcfg, device, amp_dtype, name, ckpt, log, echo, monitor=monitor)
    try:
        loop.run(st)
    except DivergedError as exc:  # non-finite: keep the last good checkpoint, say where
        raise type(exc)(f"{exc} {ckpt.note()}") from exc
    method.eval()
    return st, loop.t_start, resumed_at


def knn_monitor(cfg: dict, encoder, x: torch.Tensor, data_dir: Path, device: torch.device,
                seed: int) -> tuple[int, Callable[[], float]] | None:
    """(every, fn): validation kNN top-1 of the current encoder every `evaluate.knn_monitor_every`
    epochs (history column `val_knn_top1`).

    A monitor only: labels never reach the loss, and the accuracy-over-epochs curve shows when
    the representation stops improving. It never opens the test split: the queries are the
    validation part of the *training* set that linear evaluation holds out to choose the probe's
    weight decay (`evaluate.validation_split` with `evaluate.val_fraction` and the run's seed),
    the neighbours the rest. Features in fp32, as in evaluation. None when off.
    """
    ecfg = cfg["evaluate"]
    every = ecfg["knn_monitor_every"]
    if not every:
        return None
    from sslpipe import evaluate as ev

    _, ytr = data_mod.load_split(data_dir, "train")  # training labels only, never the test split's
    bank, val = ev.validation_split(ytr, ecfg["val_fraction"], seed)
    # Gathered once, not at every call: the images stay the same, only the encoder changes.
    xb, xv = x[torch.from_numpy(bank).to(x.device)], x[torch.from_numpy(val).to(x.device)]
    k = ev.knn_k_for(ecfg["knn_k"], len(bank))
    return every, lambda: ev.knn_monitor(encoder, xb, ytr[bank], xv, ytr[val], device, None,
                                         k, ecfg["knn_temperature"])


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
    monitor: tuple[int, Callable[[], float]] | None = None
    t_start: float = 0.0

    def __post_init__(self) -> None:
        n, b = len(self.x), self.tcfg["batch_size"]
        self.world, self.rows = ddp.world(), ddp.my_rows(b)  # rows: this rank's share of a global batch
        self.params = [p for group in self.opt.param_groups for p in group["params"]]
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
                    st.order = ddp.broadcast(torch.randperm(len(self.x), device=self.device))  # rank 0's
                    st.loss_sum, st.extra_sum = torch.zeros((), device=self.device), {}
                while st.step_in_epoch < self.steps_per_epoch:
                    self.step(st)
                    if st.step_in_epoch < self.steps_per_epoch and self.stopping(stop, st):
                        st.epoch_s = time.perf_counter() - t0
                        self.preempt(st, stop)
                self.finish_epoch(st, t0)
                if st.epoch <= epochs and self.stopping(stop, st, epoch_end=True):
                    self.preempt(st, stop)
                # Also after the last epoch: a kill while the outputs are written then costs no epoch.
                if self.ckpt.due(st.epoch - 1):
                    self.save(st)

    def step(self, st: Progress) -> None:
        b = self.tcfg["batch_size"]
        for group in self.opt.param_groups:
            group["lr"] = self.lr(st.step)
        idx = st.order[st.step_in_epoch * b:(st.step_in_epoch + 1) * b]
        if self.world > 1:
            idx = idx[self.rows]  # this rank's B/W rows of the global batch
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, logs = self.method.loss(self.x[idx], idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        ddp.average_grads(self.params)  # the global batch's gradient (a no-op in one process)
        self.opt.step()
        base.after_step(self.method)
        st.loss_sum += loss.detach().float()
        for k, v in logs.items():
            st.extra_sum[k] = st.extra_sum.get(k, 0) + v.detach().float()
        st.step += 1
        st.step_in_epoch += 1
        if st.step % self.tcfg["log_every"] == 0 and ddp.any_rank(not torch.isfinite(st.loss_sum), self.device):
            raise DivergedError(self.non_finite(st))

    def non_finite(self, st: Progress) -> str:
        hint = base.divergence_hint(self.method)
        return (f"{self.name}: the loss became non-finite at epoch {st.epoch} (step {st.step}). Lower pretrain.lr, "
                f"or use precision: fp32{'; ' + hint if hint else ''}.")

    def stopping(self, stop: StopSignals, st: Progress, epoch_end: bool = False) -> bool:
        """Whether to stop now. Under DDP all ranks must stop after the same step (the checkpoint
        is written collectively), so they agree every `log_every` steps and at epoch ends, one
        small collective each; a signal then waits at most log_every steps."""
        if self.world == 1:
            return bool(stop.received)
        if not epoch_end and st.step % self.tcfg["log_every"]:
            return False
        return ddp.any_rank(bool(stop.received), self.device)

    def finish_epoch(self, st: Progress, t0: float) -> None:
        """Close the epoch in progress: its history row (one host sync), then move `st` to the next."""
        self.sums_over_ranks(st)
        mean_loss = (st.loss_sum / self.steps_per_epoch).item()
        if not math.isfinite(mean_loss):
            raise DivergedError(self.non_finite(st))
        lr, dt = self.lr(st.step - 1), time.perf_counter() - t0
        row = {"epoch": st.epoch, "loss": mean_loss, "lr": lr,
               "images_per_s": self.steps_per_epoch * self.tcfg["batch_size"] / dt,
               "wall_s": time.perf_counter() - self.t_start}
        row.update({k: (v / self.steps_per_epoch).item() for k, v in st.extra_sum.items()})
        if self.monitor and (st.epoch % self.monitor[0] == 0 or st.epoch == self.tcfg["epochs"]):
            row["val_knn_top1"] = self.monitor[1]()
        st.history.append(row)
        self.log({k: v for k, v in row.items() if k != "epoch"}, st.epoch)
        self.echo(progress_line(st.epoch, self.tcfg["epochs"], row))
        st.epoch, st.step_in_epoch, st.order, st.epoch_s = st.epoch + 1, 0, None, 0.0
        st.loss_sum, st.extra_sum = None, {}

    def sums_over_ranks(self, st: Progress) -> None:
        """Under DDP: the partial sums (loss and logs) become their mean over ranks, one collective.
        At an epoch's end that is the global batch's loss; before a mid-epoch checkpoint it makes
        rank 0's saved sums every rank's, and since the mean is linear the resumed epoch still
        logs mean_r(saved_r + rest_r) (each rank resumes from rank 0's checkpoint)."""
        if self.world > 1 and st.loss_sum is not None:
            keys = sorted(st.extra_sum)
            sums = ddp.mean(torch.stack([st.loss_sum, *(st.extra_sum[k] for k in keys)]))
            st.loss_sum, st.extra_sum = sums[0], dict(zip(keys, sums[1:]))

    def save(self, st: Progress) -> None:
        st.train_s = time.perf_counter() - self.t_start
        self.ckpt.save(self.method, self.opt, st, st.where(self.steps_per_epoch, self.tcfg["epochs"]))

    def preempt(self, st: Progress, stop: StopSignals) -> None:
        """Write the checkpoint for where `st` stands and raise Preempted."""
        diverged = st.loss_sum is not None and not torch.isfinite(st.loss_sum)
        if ddp.any_rank(diverged, self.device):  # never save a diverged state
            raise DivergedError(self.non_finite(st))
        self.sums_over_ranks(st)  # the process stops after this: the sums are not used again here
        self.save(st)
        raise Preempted(f"{self.name}: preempted by {stop.name or 'a signal to another process'} at {self.ckpt.last}; checkpoint written to "
                        f"{self.ckpt.path}; rerun to resume (the same command, or snakemake again).")


def progress_line(epoch: int, epochs: int, row: dict) -> str:
    """'epoch 3/8 loss 4.1234 lr 1.9e-03 1520 img/s elapsed 0:42 eta 1:10 val kNN 61.2%' (plain text:
    logs are files, and a progress bar's carriage returns would garble them)."""
    clock = progress.clock
    eta = row["wall_s"] / epoch * (epochs - epoch)
    extra = f" val kNN {100 * row['val_knn_top1']:.1f}%" if "val_knn_top1" in row else ""
    return (f"epoch {epoch}/{epochs} loss {row['loss']:.4f} lr {row['lr']:.2e} {row['images_per_s']:.0f} img/s "
            f"elapsed {clock(row['wall_s'])} eta {clock(eta)}{extra}")


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
    if ddp.is_main():  # under DDP the stage runs on every rank; rank 0 writes
        write_json(out_dir / "summary.json", summary)
