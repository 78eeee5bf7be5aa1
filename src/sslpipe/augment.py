"""Batched view augmentations: one call transforms a whole batch, with per-sample random parameters.

The data stays on the training device as uint8; a batch is converted to float in [0, 1] and
augmented there, so no per-image Python runs in the hot path (the design of the fastest CIFAR
trainers). Ops come from `kornia.augmentation`, which samples parameters per sample from
torch's global generator: seeding torch seeds the views.

A *view policy* is a JSON-able dict (written to `policy.json` by the augment stage and read
back by pretraining), so the views a method trains on are exactly the ones validated and
previewed.
"""
from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import Tensor, nn

# SimCLR (Chen et al. 2020, appendix A): colour jitter of strength s is brightness, contrast and
# saturation 0.8 s and hue 0.2 s; blur kernel about 10% of the image side; sigma in [0.1, 2.0].
JITTER_BCS, JITTER_HUE = 0.8, 0.2


def to_float(x: Tensor) -> Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1]."""
    return x.float().div_(255.0)


def view_pipeline(views: dict, image_size: int) -> nn.Module:
    """A kornia pipeline for one view policy (`views` as in the config schema's $defs/views).

    Input and output: float N x C x H x W in [0, 1]; output side is `image_size`.
    """
    s = views["jitter_strength"]
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, ~10% of the side
    ops: list[nn.Module] = [
        K.RandomResizedCrop((image_size, image_size), scale=tuple(views["crop_scale"]),
                            ratio=tuple(views["crop_ratio"]), p=1.0),
        K.RandomHorizontalFlip(p=views["flip_p"]),
    ]
    if views["jitter_p"] > 0 and s > 0:
        ops.append(K.ColorJitter(JITTER_BCS * s, JITTER_BCS * s, JITTER_BCS * s, JITTER_HUE * s, p=views["jitter_p"]))
    if views["grayscale_p"] > 0:
        ops.append(K.RandomGrayscale(p=views["grayscale_p"]))
    if views["blur_p"] > 0:
        ops.append(K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=views["blur_p"]))
    if views["solarize_p"] > 0:
        # kornia draws the threshold from 0.5 +- thresholds; 0 gives the usual fixed 0.5.
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=views["solarize_p"]))
    return K.AugmentationSequential(*ops, data_keys=["input"])


class ViewMaker:
    """Makes `n_views` independently augmented views of a uint8 batch."""

    def __init__(self, policy: dict):
        self.policy = policy
        self.pipeline = view_pipeline(policy["views"], policy["image_size"])

    def __call__(self, x: Tensor, n_views: int | None = None) -> list[Tensor]:
        x01 = to_float(x) if x.dtype == torch.uint8 else x
        return [self.pipeline(x01) for _ in range(n_views or self.policy["n_views"])]


# ---- method-specific batched transforms ----------------------------------------------------

def jigsaw(x: Tensor, grid: int, perm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cut each image into grid x grid patches and permute them, per sample (PIRL's I^t).

    x: N x C x H x W (H, W divisible by grid after cropping to a multiple).
    Returns patches N x P x C x h x w (P = grid^2, in permuted order) and perm N x P, where
    patches[n, j] is the original patch perm[n, j] (row-major).
    """
    n, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    x = x[:, :, : ph * grid, : pw * grid]
    # N x C x g x ph x g x pw -> N x (g*g) x C x ph x pw, row-major patch order
    patches = x.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    if perm is None:
        perm = torch.argsort(torch.rand(n, grid * grid, device=x.device), dim=1)
    index = perm[:, :, None, None, None].expand_as(patches)
    return torch.gather(patches, 1, index), perm


def unjigsaw(patches: Tensor, perm: Tensor) -> Tensor:
    """Invert `jigsaw`: patches N x P x C x h x w in permuted order -> N x C x (g h) x (g w)."""
    n, p, c, ph, pw = patches.shape
    grid = math.isqrt(p)
    inverse = torch.argsort(perm, dim=1)
    ordered = torch.gather(patches, 1, inverse[:, :, None, None, None].expand_as(patches))
    return ordered.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, grid * ph, grid * pw)


def corrupt(x: Tensor, kind: str, *, noise_std: float = 0.3, mask_ratio: float = 0.5,
            mask_patch: int = 4, salt_pepper: float = 0.2) -> Tensor:
    """Corrupt a float batch in [0, 1] for a denoising autoencoder (per-sample random noise).

    gaussian: x + N(0, noise_std^2), clipped; mask: zero a random `mask_ratio` of
    mask_patch x mask_patch patches (the masked-autoencoder view); salt_pepper: a
    `salt_pepper` fraction of pixels set to 0 or 1.
    """
    n, c, h, w = x.shape
    if kind == "gaussian":
        return (x + noise_std * torch.randn_like(x)).clamp_(0, 1)
    if kind == "mask":
        gh, gw = math.ceil(h / mask_patch), math.ceil(w / mask_patch)
        keep = (torch.rand(n, 1, gh, gw, device=x.device) >= mask_ratio).to(x.dtype)
        keep = keep.repeat_interleave(mask_patch, 2).repeat_interleave(mask_patch, 3)[:, :, :h, :w]
        return x * keep
    if kind == "salt_pepper":
        hit = torch.rand(n, 1, h, w, device=x.device) < salt_pepper
        salt = (torch.rand(n, 1, h, w, device=x.device) < 0.5).to(x.dtype)
        return torch.where(hit, salt.expand_as(x), x)
    raise ValueError(f"unknown corruption '{kind}': use gaussian, mask or salt_pepper")


def preview_grid(images: Tensor, views: list[Tensor]) -> Tensor:
    """Rows = samples; columns = the original then each view (all N x C x h x w in [0, 1]).

    Returns 3 x H' x W' float in [0, 1], ready for `save_png`.
    """
    import torchvision

    cols = [images] + list(views)
    size = images.shape[-1]
    cols = [torch.nn.functional.interpolate(c.float(), size=(size, size)) if c.shape[-1] != size else c.float()
            for c in cols]
    tiles = torch.stack(cols, dim=1).flatten(0, 1)  # (N * (1+V)) x C x H x W, row-major
    return torchvision.utils.make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0)
