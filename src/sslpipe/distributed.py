"""Multi-process (DDP) pretraining: small free functions over torch.distributed.

`torchrun --nproc_per_node N -m sslpipe pretrain ...` starts N processes with RANK, LOCAL_RANK
and WORLD_SIZE in their environment (across M nodes, `srun torchrun --nnodes M --rdzv-backend c10d
...` on each node: WORLD_SIZE = M * N, RANK global, LOCAL_RANK the GPU on its node); `init` joins them into one process group (NCCL on CUDA,
one GPU per process: cuda:LOCAL_RANK; gloo on the CPU). Without torchrun nothing is set up and
every helper here is the identity, so a plain `python -m sslpipe pretrain` runs exactly as a
single process always did.

How training is split (pretrain.py, methods/*): every rank holds the whole training set and
draws the same global permutation (rank 0's, broadcast); rank r takes rows
[r*B/W, (r+1)*B/W) of each global batch of B. Gradients are averaged with one all_reduce over
one flat buffer after backward (`average_grads`), not by DistributedDataParallel: the methods
call their encoders several times per loss (MoCo's BN groups, PIRL's patches, CD's Langevin
sampler, which differentiates the energy w.r.t. pixels inside the loss), and DDP's reducer
assumes one forward per backward and by default re-broadcasts every buffer from rank 0 on
each forward (PIRL's memory bank, CD's replay buffer). The mathematics is the same as DDP's.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn


def launched() -> bool:
    """True in a process that torchrun started with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_pref: str = "auto") -> None:
    """Join torchrun's process group (a no-op without torchrun or when already joined).

    NCCL and cuda:LOCAL_RANK when the config's `device` allows CUDA and it is present; gloo
    on the CPU otherwise. MASTER_ADDR/MASTER_PORT come from torchrun (env:// rendezvous).
    """
    if not launched() or dist.is_initialized():
        return
    cuda = device_pref != "cpu" and torch.cuda.is_available()
    if cuda:  # LOCAL_RANK: the rank within this node (across nodes RANK goes on from node to node)
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(gpu)  # "cuda" now means this GPU
        # device_id binds NCCL's communicator to this GPU, so barrier() and all_gather_object
        # never guess a GPU from the global rank (wrong on a node whose ranks do not start at 0).
        dist.init_process_group("nccl", device_id=gpu)
    else:
        dist.init_process_group("gloo")
    atexit.register(teardown)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that logs, tracks and writes outputs."""
    return rank() == 0


def my_rows(n_global: int) -> slice:
    """This rank's rows of a global batch of n_global (divisible by the world size)."""
    b = n_global // world()
    return slice(rank() * b, (rank() + 1) * b)


def gather(t: Tensor) -> Tensor:
    """All ranks' `t` concatenated in rank order (N x ... -> W*N x ...), with autograd.

    The backward sums every rank's gradient for rank r's rows back into rank r (reduce-scatter
    on NCCL, all-to-all on gloo), so a loss that uses other ranks' rows still trains this
    rank's encoder with the gradient the single-process loss would give it.
    """
    if world() == 1:
        return t
    return torch.cat(dist_nn.all_gather(t.contiguous()))


@torch.no_grad()
def gather_nograd(t: Tensor) -> Tensor:
    """All ranks' `t` concatenated in rank order, no autograd (keys, indices, bank rows)."""
    if world() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


@torch.no_grad()
def broadcast(t: Tensor) -> Tensor:
    """Rank 0's `t` on every rank (in place; returned for chaining)."""
    if world() > 1:
        dist.broadcast(t, src=0)
    return t


@torch.no_grad()
def mean(t: Tensor) -> Tensor:
    """The mean of `t` over ranks (a new tensor; `t` itself when alone)."""
    if world() == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank: one collective, so every rank takes the same branch."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@torch.no_grad()
def average_grads(params: list[Tensor]) -> None:
    """p.grad <- mean over ranks of p.grad, for every p with a gradient: one flat all_reduce.

    Every rank's loss is the mean over its B/W rows, so the mean of the ranks' gradients is
    the gradient of the mean over the global batch of B, the single-process gradient.
    """
    if world() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # flat: sum of numels, one collective
    dist.all_reduce(flat)
    flat /= world()
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view(g.shape))


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Every parameter and buffer of `module` from rank 0: all ranks start from one model."""
    if world() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


# ---- BatchNorm over the global batch -----------------------------------------------------------

class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every rank's batch; the CPU stand-in for
    nn.SyncBatchNorm, which (torch 2.14) refuses CPU tensors.

    In training mode with W > 1: per-channel sum, sum of squares and count are all-reduced
    with autograd (one collective forward, one backward), so both the normalisation and its
    gradient are those of one BatchNorm over the global batch. Otherwise plain batch_norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])   # stats: 2C + 1
        stats = dist_nn.all_reduce(stats)                                # summed over ranks
        total = stats[-1]
        mu = stats[:c] / total                                           # mu: C
        var = (stats[c:2 * c] / total - mu * mu).clamp_min(0)            # var: C (biased)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mu.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():  # as nn.BatchNorm: running variance unbiased
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mu.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (total / (total - 1).clamp_min(1)) * m)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` normalised over the global batch (a no-op when alone).

    nn.SyncBatchNorm on CUDA; GlobalBatchNorm elsewhere. Children are replaced in place (the
    returned module is `module` unless it is itself a BatchNorm); state_dict keys do not change.
    """
    if world() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats).to(device)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, device))
    return module
