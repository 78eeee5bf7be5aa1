"""MoCo v2: Momentum Contrast (He et al. 2020) with the improvements of Chen et al. 2020
("Improved Baselines with Momentum Contrastive Learning", arXiv:2003.04297: a 2-layer MLP head
Linear-ReLU-Linear, without BatchNorm; aug+ = SimCLR's views with Gaussian blur, p = 0.5; T = 0.2).

A query encoder f_q (encoder + MLP head) is trained with InfoNCE (He et al. eq. 1) to match the
key k_+ of another view of the same image against K negatives: the keys of earlier batches, kept
in a FIFO queue. The key encoder f_k is a copy of f_q that is never trained by gradients; it
follows f_q by a momentum update (eq. 2), so the keys in the queue stay consistent.

Departures from the paper: shuffling BN is simulated on one device by BatchNorm groups (see
`MoCo`); the queue length, temperature and the blur of the views are config keys (the CIFAR
configs set them from a CIFAR recipe, named there); the optimiser is the pipeline's (the
paper uses SGD, lr 0.03 at batch 256, on ImageNet).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe import distributed as ddp
from sslpipe.augment import ViewMaker
from sslpipe.methods.shared import momentum_update, view_policy
from sslpipe.models import Encoder, mlp_head


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """The logits of MoCo's (1+K)-way softmax classifier, positive first (He et al. Alg. 1).

    q, k: N x C L2-normalised queries and their positive keys; queue: K x C normalised negatives.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)            # l_pos: N x 1
    l_neg = q @ queue.T                                 # l_neg: N x K
    # fp32 for the softmax: under bf16 autocast the matmul comes back in bf16.
    return torch.cat([l_pos.float(), l_neg.float()], dim=1) / temperature  # logits: N x (1+K)


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE (He et al. eq. 1): -log exp(q.k+/T) / (exp(q.k+/T) + sum_i exp(q.k_i/T)), mean over N."""
    logits = moco_logits(q, k, queue, temperature)      # logits: N x (1+K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue(queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
    """FIFO: write `keys` (N x C) into `queue` (K x C) from slot `ptr` on, wrapping past the end.

    In place; `ptr` (a 0-d long tensor) then points at the oldest key. If N > K only the newest K
    keys are kept. The slots are computed on the device, so no host sync (no `int(ptr)`).
    """
    size = queue.shape[0]
    keys = keys[-size:]                                 # the newest K (all of them when N <= K)
    slots = (ptr + torch.arange(len(keys), device=queue.device)) % size  # wraps around the end
    queue[slots] = keys.to(queue.dtype)
    ptr.copy_((ptr + len(keys)) % size)


def grouped_forward(net: nn.Module, x: Tensor, groups: int, shuffle: bool) -> Tensor:
    """net on `groups` sub-batches of x, each normalised by its own BatchNorm statistics.

    With shuffle, the sub-batches are a random partition of x (MoCo's shuffling BN); the outputs
    are returned in x's order either way.
    """
    perm = torch.randperm(len(x), device=x.device) if shuffle else None
    xs = x[perm] if shuffle else x
    out = torch.cat([net(chunk) for chunk in xs.chunk(groups)])
    if not shuffle:
        return out
    return out[torch.argsort(perm)]                     # un-shuffle: row i is net(x[i]) again


def shuffled_forward_ddp(net: nn.Module, x: Tensor, groups: int) -> Tensor:
    """MoCo's shuffling BN across processes (He et al. sec. 3.3; their code's _batch_shuffle_ddp).

    x: this rank's N key views. All ranks' views are gathered (W*N), permuted by one global
    permutation (rank 0's, broadcast), rank r encodes its N rows of the shuffled batch in
    `groups` BatchNorm groups, and the outputs are gathered and un-shuffled. Returns every
    rank's keys in global batch order (W*N x C), the same on all ranks; no autograd (keys are
    constants). With bn_groups = W * groups this is exactly grouped_forward(shuffle=True) on one
    device over the global batch, given the same permutation.
    """
    x_all = ddp.gather_nograd(x)                                        # x_all: W*N x 3 x H x W
    perm = ddp.broadcast(torch.randperm(len(x_all), device=x.device))   # the same on every rank
    mine = x_all[perm][ddp.my_rows(len(x_all))]                         # mine: N x 3 x H x W
    out_all = ddp.gather_nograd(torch.cat([net(chunk) for chunk in mine.chunk(groups)]))  # W*N x C, shuffled
    return out_all[torch.argsort(perm)]


class MoCo(nn.Module):
    """MoCo v2 on one device, or on several processes (DDP).

    Shuffling BN: the paper computes BatchNorm per GPU and shuffles the key batch across GPUs,
    so a query and its positive key never share batch statistics (otherwise the model can find
    its positive from the statistics alone, "cheating" the pretext task). On one device we
    simulate cfg["bn_groups"] GPUs, as in the authors' single-GPU CIFAR demo (SplitBatchNorm): the
    queries are split into groups in batch order, the keys are randomly shuffled, split into
    groups and un-shuffled afterwards; every group is a separate forward pass, so it is
    normalised with its own batch statistics (BN running statistics then update once per
    group). The number of groups is capped so each has at least 2 images.

    Order of updates: `loss` computes the logits against the queue as it is (the keys of earlier
    batches) and keeps this batch's detached keys; `after_step` (after the optimizer step) first
    applies the momentum update to the key encoder, then enqueues those keys. The queue is never
    changed between the forward pass and the backward pass that needs it.

    DDP (W processes): BatchNorm stays per group (`global_bn = False`: no SyncBatchNorm);
    `bn_groups` counts the groups of the global batch, each rank running bn_groups // W of them
    (at least 1): queries in batch order on their own rank, keys shuffled across all ranks
    (`shuffled_forward_ddp`), as in the paper. The keys of all ranks are enqueued, in global
    batch order, so the queue is the same on every rank and equals the single-process queue.
    BatchNorm running statistics stay per rank (only train-mode batch statistics reach the
    loss); rank 0's are saved.
    """

    global_bn = False  # shuffling BN instead; see above

    name = "moco"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        return view_policy("moco", cfg["views"], image_size, n_views=2)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        return ViewMaker(policy)(x)

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        # MoCo v2's MLP head: Linear-ReLU-Linear, no BatchNorm (unlike SimCLR's g).
        self.head = mlp_head(encoder.feat_dim, cfg["proj_hidden"], cfg["proj_dim"], bn=False)
        # Key encoder: starts as a copy of the query encoder; moves only by the momentum update.
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_head = copy.deepcopy(self.head)
        for p in list(self.key_encoder.parameters()) + list(self.key_head.parameters()):
            p.requires_grad = False
        self.temperature = cfg["temperature"]
        self.momentum = cfg["momentum"]
        self.bn_groups = cfg["bn_groups"]
        self.views = ViewMaker(policy)
        # The queue starts as random unit vectors, as in the paper's code.
        self.register_buffer("queue", F.normalize(torch.randn(cfg["queue_size"], cfg["proj_dim"]), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._new_keys: Tensor | None = None  # this batch's keys, enqueued in after_step

    def _query(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def _key(self, x: Tensor) -> Tensor:
        return self.key_head(self.key_encoder(x))

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v_q, v_k = self.views(x, 2)
        world = ddp.world()
        groups = max(1, min(self.bn_groups // world, len(x) // 2))  # this rank's share of the BN groups
        q = F.normalize(grouped_forward(self._query, v_q, groups, shuffle=False).float(), dim=1)  # q: N x C
        with torch.no_grad():  # keys carry no gradient (He et al. Alg. 1: k = k.detach())
            if world == 1:
                k_all = grouped_forward(self._key, v_k, groups, shuffle=True)
            else:
                k_all = shuffled_forward_ddp(self._key, v_k, groups)  # k_all: W*N x C, every rank's
            k_all = F.normalize(k_all.float(), dim=1)
            k = k_all[ddp.my_rows(len(k_all))]  # k: N x C, this rank's rows (all of them when alone)
        loss = info_nce(q, k, self.queue, self.temperature)  # the tested loss, on the queue before this batch
        self._new_keys = k_all  # all ranks' keys: the queue stays the same on every rank
        with torch.no_grad():  # how often the positive beats every queued negative
            l_pos, l_neg = (q * k).sum(1), (q @ self.queue.T.to(q.dtype)).max(1).values  # N, N
            acc = (l_pos > l_neg).float().mean()
        return loss, {"pos_top1": acc}

    @torch.no_grad()
    def after_step(self) -> None:
        # theta_k <- m theta_k + (1 - m) theta_q (He et al. eq. 2), with the freshly stepped theta_q.
        momentum_update(self.key_encoder, self.encoder, self.momentum)
        momentum_update(self.key_head, self.head, self.momentum)
        if self._new_keys is not None:
            enqueue(self.queue, self.queue_ptr, self._new_keys)
            self._new_keys = None
