"""Backbones. Every encoder maps float images in [0, 1] (N x 3 x H x W) to features N x D.

Normalisation by the dataset's channel mean/std is the encoder's first step, so evaluation,
Langevin sampling (CD) and reconstruction (DAE) all work in plain pixel space.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


def small_cnn(width: int = 32) -> tuple[nn.Module, int]:
    """A 4-block conv net for CPU runs: 3 downsamplings, global average pool. Feature dim 4*width."""
    def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    w = width
    net = nn.Sequential(*block(3, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, True),
                        *block(4 * w, 4 * w, False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 4 * w


def resnet18_cifar() -> tuple[nn.Module, int]:
    """ResNet-18 with the CIFAR stem (He et al. 2016; SimCLR appendix B.9): 3x3 stride-1 first
    conv and no max-pool, so 32x32 inputs keep their resolution. Feature dim 512."""
    import torchvision  # imported here: it costs ~2 s, and most jobs never need it

    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss, no such device); the message says what to change."""


class DivergedError(TrainingError):
    """The training state went bad (a non-finite loss; a method's own check, e.g. CD's collapsed
    chains): the loop never checkpoints such a state, and keeps the last good checkpoint."""


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block; afterwards every submodule's train/eval flag is
    put back as it was, per module (so mixed modes survive), also when the block raises."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, training in modes:
            m.training = training


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise TrainingError("config key 'device' is 'cuda' but no CUDA device is visible: use device: auto or cpu.")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def pick_dtype(pref: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if pref == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:  # bf16 matmuls are only fast (and exact enough) with native AVX512-BF16 or AMX
        supported = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if pref == "bf16" and not supported:
        raise TrainingError(f"config key 'precision' is 'bf16' but {device.type} has no bf16 support: use auto or fp32.")
    return torch.bfloat16 if supported else None


class Encoder(nn.Module):
    """Normalise, then the backbone. `feat_dim` is the size of the features evaluation uses."""

    def __init__(self, backbone: nn.Module, feat_dim: int, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # x: N x 3 x H x W in [0, 1] -> N x feat_dim
        return self.backbone((x - self.mean) / self.std)


def spatial_features(encoder: Encoder, x: Tensor) -> Tensor:
    """The encoder's last feature map before global average pooling: x N x 3 x H x W in [0, 1]
    -> N x feat_dim x h x w (h about H/8 for small_cnn and CIFAR-stem resnet18), whose spatial mean
    is `encoder(x)`. For decoders that need where things are (DAE); additive, so what
    `Encoder.forward` returns is unchanged."""
    h = (x - encoder.mean) / encoder.std
    net = encoder.backbone
    if isinstance(net, nn.Sequential) and isinstance(net[-2], nn.AdaptiveAvgPool2d):  # small_cnn
        return net[:-2](h)
    if hasattr(net, "layer4"):  # torchvision ResNet: the stem and the four stages, no pool / fc
        h = net.maxpool(net.relu(net.bn1(net.conv1(h))))
        return net.layer4(net.layer3(net.layer2(net.layer1(h))))
    raise ValueError(f"spatial_features: unsupported backbone {type(net).__name__}")


def build_encoder(model_cfg: dict, manifest: dict) -> Encoder:
    """The encoder for a config's `model` section and a dataset manifest (for mean/std)."""
    name = model_cfg["backbone"]
    if name == "small_cnn":
        backbone, dim = small_cnn(model_cfg["width"])
    elif name == "resnet18":
        backbone, dim = resnet18_cifar()
    else:
        raise ValueError(f"unknown backbone '{name}': use small_cnn or resnet18")
    # Clamp tiny stds (e.g. a constant channel) so normalisation never divides by ~0.
    std = [max(s, 1e-3) for s in manifest["std"]]
    return Encoder(backbone, dim, manifest["mean"], std)


def load_encoder(model_cfg: dict, manifest: dict, path) -> nn.Module:
    """Rebuild an encoder and load its weights; never unpickles arbitrary objects."""
    encoder = build_encoder(model_cfg, manifest)
    encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return encoder


def mlp_head(in_dim: int, hidden: int, out_dim: int, bn: bool = True) -> nn.Module:
    """The projection head g(.) of SimCLR / MoCo v2: Linear-BN-ReLU-Linear."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


def state_fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer, to prove a frozen encoder was not changed."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
