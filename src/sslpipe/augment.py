"""Batched view augmentations: one call transforms a whole batch, with per-sample random parameters.

The data stays on the training device as uint8; a batch is converted to float in [0, 1] and
augmented there, so no per-image Python runs in the hot path (the design of the fastest CIFAR
trainers). Every op is a handful of whole-batch tensor ops written here: on a 2-core CPU the
crop+flip is ~8x and the colour jitter ~10x faster than kornia's ops, the whole SimCLR policy
~3.5x faster than kornia and 12-15x faster than torchvision v2 per image in a 2-worker DataLoader
(`benchmarks/bench_augment.py`; figures in benchmarks/RESULTS.md):

* random resized crop + horizontal flip: ONE `grid_sample` per batch; each sample's crop box and
  flip become the scale/offset of its sampling grid (bilinear, border clamping);
* colour jitter: brightness, contrast, saturation and hue are each a per-sample affine map of
  the RGB vector (hue as a rotation about the grey axis in YIQ space, an approximation of an HSV
  hue shift), applied in a per-sample random order with clamping after each, as torchvision does;
* grayscale, Gaussian blur (separable, per-sample sigma, reflect padding) and solarisation are
  per-sample masks/weights over whole-batch ops.

`ViewMaker` pushes all n views of a batch through the pipeline in one call (one n x N batch).
Per-sample parameters are drawn from torch's global generator on the batch's device (seeding
torch seeds the views; no host/device sync), and the last ones drawn are kept on the pipeline
(`ViewPipeline.last_params`) so tests can inspect them. The kornia version of the same policy
is kept as `kornia_view_pipeline` in benchmarks/bench_augment.py, the reference it compares against.

A *view policy* is a JSON-able dict (written to `policy.json` by the augment stage and read
back by pretraining), so the views a method trains on are exactly the ones validated and
previewed.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.io import make_grid

# SimCLR (Chen et al. 2020, appendix A): colour jitter of strength s is brightness, contrast and
# saturation 0.8 s and hue 0.2 s; blur kernel about 10% of the image side; sigma in [0.1, 2.0].
JITTER_BCS, JITTER_HUE = 0.8, 0.2
BLUR_SIGMA = (0.1, 2.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CROP_TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 (area, ratio) pairs per image
# RGB <-> YIQ (NTSC): Y is luma; a hue shift is a rotation in the I-Q plane.
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def to_float(x: Tensor) -> Tensor:
    """uint8 NCHW -> float32 NCHW in [0, 1]."""
    return x.float().div_(255.0)


def blur_kernel_size(image_size: int) -> int:
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)  # odd, ~10% of the side


# ---- parameter sampling (all per sample, from torch's global generator) ---------------------

def sample_crops(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 device: torch.device | str = "cpu", tries: int = CROP_TRIES) -> Tensor:
    """Crop boxes N x 4 (x0, y0, w, h) in input pixels (continuous), as torchvision's
    RandomResizedCrop: area fraction ~ U(scale), log aspect ratio w/h ~ U(log ratio); the first of
    `tries` draws that fits the image wins; if none fits, the central crop of the clamped ratio."""
    area = height * width
    target = torch.empty(n, tries, device=device).uniform_(scale[0], scale[1]) * area
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = log_r.exp()
    w, h = (target * r).sqrt(), (target / r).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first draw that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    any_fits = fits.any(1)
    in_ratio = width / height  # fallback (no draw fits): torchvision's central crop
    if in_ratio < min(ratio):
        fw, fh = width, width / min(ratio)
    elif in_ratio > max(ratio):
        fw, fh = height * max(ratio), height
    else:
        fw, fh = width, height
    w = torch.where(any_fits, w, torch.full_like(w, fw))
    h = torch.where(any_fits, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, device=device)
    u = torch.where(any_fits[:, None], u, torch.full_like(u, 0.5))
    x0, y0 = u[:, 0] * (width - w), u[:, 1] * (height - h)
    return torch.stack([x0, y0, w, h], 1)


def _uniform(n: int, lo: float, hi: float, device) -> Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _bernoulli(n: int, p: float, device) -> Tensor:
    return torch.rand(n, device=device) < p


# ---- batched ops ----------------------------------------------------------------------------

def crop_flip(x: Tensor, box: Tensor, flip: Tensor, size: int) -> Tensor:
    """Resample each image's box (N x 4: x0, y0, w, h in pixels) to size x size, mirrored where
    `flip` (N bools): one bilinear `grid_sample` over the batch. A box of the whole image with
    no flip returns the image (samples fall on pixel centres)."""
    n, _, height, width = x.shape
    x0, y0, w, h = box.unbind(1)
    sx = torch.where(flip, -w, w) / width            # grid x = sx * u + cx, u in [-1, 1] over the output
    cx = (2 * x0 + w) / width - 1
    sy, cy = h / height, (2 * y0 + h) / height - 1
    u = torch.linspace(-1 + 1 / size, 1 - 1 / size, size, device=x.device)  # output pixel centres
    gx = (sx[:, None] * u + cx[:, None])[:, None, :].expand(n, size, size)
    gy = (sy[:, None] * u + cy[:, None])[:, :, None].expand(n, size, size)
    grid = torch.stack([gx, gy], -1)                 # N x size x size x 2 (x, y)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=None)
def _consts(device: torch.device) -> dict[str, Tensor]:
    """Constant colour matrices, built once per device (no host-to-device copy per batch)."""
    f64 = torch.float64
    t = torch.tensor(_RGB2YIQ, dtype=f64)
    ti = torch.linalg.inv(t)
    gray = torch.tensor(GRAY_WEIGHTS, dtype=f64)
    # Hue rotation by theta in the I-Q plane, T^-1 R(theta) T = A + cos(theta) B + sin(theta) C
    rot_sin = torch.tensor([[0.0, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=f64)
    consts = {"eye": torch.eye(3, dtype=f64), "gray_mat": gray.expand(3, 3),
              "hue_a": ti @ torch.diag(torch.tensor([1.0, 0, 0], dtype=f64)) @ t,
              "hue_b": ti @ torch.diag(torch.tensor([0.0, 1, 1], dtype=f64)) @ t,
              "hue_c": ti @ rot_sin @ t}
    return {k: v.to(device=device, dtype=torch.float32) for k, v in consts.items()}


def jitter_matrices(b: Tensor, c: Tensor, s: Tensor, hue: Tensor) -> Tensor:
    """Per-sample 3 x 3 RGB maps of brightness, contrast (its linear part; the offset depends on
    the image), saturation and hue, stacked in that order: N x 4 x 3 x 3."""
    k = _consts(b.device)
    eye = k["eye"]
    mb = b[:, None, None] * eye
    mc = c[:, None, None] * eye
    ms = s[:, None, None] * eye + (1 - s)[:, None, None] * k["gray_mat"]  # blend with (Y, Y, Y)
    theta = hue * (-2 * math.pi)  # hue factor in turns, as torchvision; the I-Q angle runs the other way
    mh = k["hue_a"] + theta.cos()[:, None, None] * k["hue_b"] + theta.sin()[:, None, None] * k["hue_c"]
    mh = torch.where((hue == 0)[:, None, None], eye, mh)  # exactly the identity when no hue shift
    return torch.stack([mb, mc, ms, mh], 1)


def color_jitter(x: Tensor, b: Tensor, c: Tensor, s: Tensor, hue: Tensor, order: Tensor) -> Tensor:
    """torchvision's ColorJitter, batched: sample n applies its four ops in the order order[n]
    (a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE), clamping to [0, 1] after each.
    Each op is affine in RGB, so one slot is one batched 3 x 3 matmul plus an offset.
    Factors 1, 1, 1, 0 are the identity."""
    n, ch, hgt, wid = x.shape
    mats = jitter_matrices(b, c, s, hue)             # N x 4 x 3 x 3
    # in each sample's order, slot-major and contiguous (bmm on strided batches is 8x slower)
    slot_mats = mats.gather(1, order[:, :, None, None].expand(n, 4, 3, 3)).transpose(0, 1).contiguous()
    y = x.reshape(n, ch, hgt * wid)
    for slot in range(4):
        # contrast blends with the mean luma of the current image (torchvision's adjust_contrast)
        is_c = order[:, slot] == CONTRAST
        offset = torch.where(is_c, (1 - c) * luma(y.mean(2)[:, :, None, None]).view(n), torch.zeros_like(c))
        y = torch.bmm(slot_mats[slot], y).add_(offset[:, None, None]).clamp_(0, 1)  # (baddbmm: 6x slower)
    return y.reshape(n, ch, hgt, wid)


def luma(x: Tensor) -> Tensor:
    """N x 3 x H x W -> N x 1 x H x W, torchvision's rgb_to_grayscale weights."""
    y = x[:, 0:1] * GRAY_WEIGHTS[0]
    return y.add_(x[:, 1:2], alpha=GRAY_WEIGHTS[1]).add_(x[:, 2:3], alpha=GRAY_WEIGHTS[2])


def grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace the images where `mask` by their luma, replicated to 3 channels."""
    return torch.where(mask[:, None, None, None], luma(x), x)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma (N), reflect padding. sigma <= 0 leaves
    the sample unchanged (a delta kernel). One in-place multiply-add per tap and direction
    (on the CPU faster than a grouped conv, and several times faster than out-of-place products)."""
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    safe = sigma.clamp_min(1e-6)[:, None]
    w = torch.exp(-t ** 2 / (2 * safe ** 2))
    w = torch.where((sigma > 0)[:, None], w, (t == 0).to(x.dtype).expand_as(w))
    w = (w / w.sum(1, keepdim=True))[:, :, None, None, None]  # N x k x 1 x 1 x 1
    hgt, wid = x.shape[-2:]
    xp = F.pad(x, (r, r, r, r), mode="reflect")      # rows padded too: the vertical pass reads them
    horiz = xp[..., 0:wid] * w[:, 0]
    for i in range(1, kernel):
        horiz.addcmul_(xp[..., i:i + wid], w[:, i])
    out = horiz[..., 0:hgt, :] * w[:, 0]
    for i in range(1, kernel):
        out.addcmul_(horiz[..., i:i + hgt, :], w[:, i])
    return out


def solarize(x: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    return torch.where(mask[:, None, None, None] & (x >= threshold), 1 - x, x)


# ---- the pipeline ---------------------------------------------------------------------------

class ViewPipeline(nn.Module):
    """One view policy as batched ops. Input: float N x C x H x W in [0, 1]; output: float32
    N x C x S x S in [0, 1], S = image_size. The last parameters drawn are in `last_params`:
    box (N x 4: x0, y0, w, h in input pixels), flip, jitter (applied or not), brightness,
    contrast, saturation, hue, order (N x 4), gray, blur, sigma (0 where not blurred), solarize.
    """

    def __init__(self, views: dict, image_size: int):
        super().__init__()
        self.views = dict(views)
        self.image_size = image_size
        s = views["jitter_strength"]
        self.bcs, self.hue = JITTER_BCS * s, JITTER_HUE * s
        self.jitter_on = views["jitter_p"] > 0 and s > 0
        self.kernel = blur_kernel_size(image_size)
        self.last_params: dict[str, Tensor] = {}

    def sample(self, n: int, height: int, width: int, device) -> dict[str, Tensor]:
        v = self.views
        p = {"box": sample_crops(n, height, width, tuple(v["crop_scale"]), tuple(v["crop_ratio"]), device),
             "flip": _bernoulli(n, v["flip_p"], device)}
        jit = _bernoulli(n, v["jitter_p"] if self.jitter_on else 0.0, device)
        lo = max(0.0, 1 - self.bcs)
        ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
        for key in ("brightness", "contrast", "saturation"):
            p[key] = torch.where(jit, _uniform(n, lo, 1 + self.bcs, device), ones)
        p["hue"] = torch.where(jit, _uniform(n, -self.hue, self.hue, device), zeros)
        p["order"] = torch.rand(n, 4, device=device).argsort(1)
        p["jitter"] = jit
        p["gray"] = _bernoulli(n, v["grayscale_p"], device)
        p["blur"] = _bernoulli(n, v["blur_p"], device)
        p["sigma"] = torch.where(p["blur"], _uniform(n, *BLUR_SIGMA, device), zeros)
        p["solarize"] = _bernoulli(n, v["solarize_p"], device)
        return p

    def forward(self, x: Tensor) -> Tensor:
        # Augmentation runs in fp32 even inside the training loop's autocast region.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float().contiguous()
            p = self.last_params = self.sample(x.shape[0], x.shape[-2], x.shape[-1], x.device)
            v = self.views
            out = crop_flip(x, p["box"], p["flip"], self.image_size)
            if self.jitter_on:
                out = color_jitter(out, p["brightness"], p["contrast"], p["saturation"], p["hue"], p["order"])
            if v["grayscale_p"] > 0:
                out = grayscale(out, p["gray"])
            if v["blur_p"] > 0:
                out = gaussian_blur(out, p["sigma"], self.kernel)
            if v["solarize_p"] > 0:
                out = solarize(out, p["solarize"])
            return out


def view_pipeline(views: dict, image_size: int) -> nn.Module:
    """The batched pipeline for one view policy (`views` as in the config schema's $defs/views).

    Input and output: float N x C x H x W in [0, 1]; output side is `image_size`.
    """
    return ViewPipeline(views, image_size)


class ViewMaker:
    """Makes `n_views` independently augmented views of a uint8 (or float in [0, 1]) batch.

    All views go through the pipeline in one call (an n_views x N batch), so the per-call
    overhead is paid once; `pipeline.last_params` then covers view 0's N samples, then view 1's.
    """

    def __init__(self, policy: dict):
        self.policy = policy
        self.pipeline = view_pipeline(policy["views"], policy["image_size"])

    def __call__(self, x: Tensor, n_views: int | None = None) -> list[Tensor]:
        n_views = n_views or self.policy["n_views"]
        if n_views > 1:
            x = x.repeat(n_views, 1, 1, 1)  # on uint8 when given uint8: a quarter of the bytes
        x01 = to_float(x) if x.dtype == torch.uint8 else x
        return list(self.pipeline(x01).chunk(n_views))


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


def jigsaw_view(x: Tensor, grid: int, image_size: int, views: dict, scale: tuple[float, float],
                tile_crop: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PIRL's jigsaw input, each tile augmented on its own (Misra & van der Maaten 2020, sec. 4).

    x: N x C x H x W float in [0, 1] -> N x C x S x S, S = grid * (image_size // grid): the image
    whose grid cells are the tiles, in place (`jigsaw` then cuts and shuffles them), and the
    parameters drawn. One random resized crop of each image (area ~ U(scale), `views`' ratio)
    is split into grid x grid cells; in every cell, a box of `tile_crop` of the cell's side at a
    uniformly random position is resampled to the cell's pixels (the paper's 64 px of an 85 px
    cell: tiles do not touch, so edges cannot be matched), mirrored with `views`' flip_p, colour
    jittered and greyed with `views`' probabilities, all with per-tile random parameters: one
    `crop_flip` and one `color_jitter` over the N * P tiles (P = grid^2). Blur and solarisation
    are not applied to tiles.
    Params: box (N x 4, the crop), tile_box (N*P x 4, in input pixels), flip, brightness,
    contrast, saturation, hue, order, gray (per tile, N*P rows, image-major).
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.float().contiguous()
        n, c, height, width = x.shape
        p, cell, dev = grid * grid, image_size // grid, x.device
        photo = ViewPipeline(views, cell)
        params = photo.sample(n * p, height, width, dev)   # per tile: flip and the photometric draws
        box = sample_crops(n, height, width, tuple(scale), tuple(views["crop_ratio"]), dev)  # N x 4
        rc = torch.arange(p, device=dev)
        col, row = (rc % grid).float(), (rc // grid).float()            # P, row-major cells
        off = torch.rand(n, p, 2, device=dev) * (1 - tile_crop)         # offset in the cell, in cells
        x0, y0, w, h = (t[:, None] for t in box.unbind(1))              # N x 1 each
        tile_box = torch.stack([x0 + w * (col + off[..., 0]) / grid, y0 + h * (row + off[..., 1]) / grid,
                                (w * tile_crop / grid).expand(n, p), (h * tile_crop / grid).expand(n, p)], -1)
        tile_box = tile_box.reshape(n * p, 4)
        tiles = crop_flip(x.repeat_interleave(p, 0), tile_box, params["flip"], cell)  # N*P x C x cell x cell
        if photo.jitter_on:
            tiles = color_jitter(tiles, params["brightness"], params["contrast"], params["saturation"],
                                 params["hue"], params["order"])
        if views["grayscale_p"] > 0:
            tiles = grayscale(tiles, params["gray"])
        keys = ("flip", "brightness", "contrast", "saturation", "hue", "order", "gray")
        out = {"box": box, "tile_box": tile_box, **{k: params[k] for k in keys}}
        identity = rc.expand(n, p)
        return unjigsaw(tiles.reshape(n, p, c, cell, cell), identity), out


def patch_mask(n: int, h: int, w: int, mask_ratio: float, mask_patch: int, device=None) -> Tensor:
    """Per-sample random patch mask, True where a pixel is masked: N x 1 x H x W bool.

    Each mask_patch x mask_patch cell (the last row/column cut to fit) is masked independently
    with probability mask_ratio (the masked-autoencoder corruption, He et al. 2022)."""
    gh, gw = math.ceil(h / mask_patch), math.ceil(w / mask_patch)
    masked = torch.rand(n, 1, gh, gw, device=device) < mask_ratio
    return masked.repeat_interleave(mask_patch, 2).repeat_interleave(mask_patch, 3)[:, :, :h, :w]


def corrupt(x: Tensor, kind: str, *, noise_std: float = 0.3, mask_ratio: float = 0.5,
            mask_patch: int = 4, salt_pepper: float = 0.2, fill: float | Tensor = 0.0) -> Tensor:
    """Corrupt a float batch in [0, 1] for a denoising autoencoder (per-sample random noise).

    gaussian: x + N(0, noise_std^2), clipped; mask: set a random `mask_ratio` of
    mask_patch x mask_patch patches to `fill` (0, or e.g. the channel mean as 1 x C x 1 x 1;
    see `patch_mask`); salt_pepper: a `salt_pepper` fraction of pixels set to 0 or 1.
    """
    n, c, h, w = x.shape
    if kind == "gaussian":
        return (x + noise_std * torch.randn_like(x)).clamp_(0, 1)
    if kind == "mask":
        masked = patch_mask(n, h, w, mask_ratio, mask_patch, x.device)
        return torch.where(masked, torch.as_tensor(fill, dtype=x.dtype, device=x.device), x)
    if kind == "salt_pepper":
        hit = torch.rand(n, 1, h, w, device=x.device) < salt_pepper
        salt = (torch.rand(n, 1, h, w, device=x.device) < 0.5).to(x.dtype)
        return torch.where(hit, salt.expand_as(x), x)
    raise ValueError(f"unknown corruption '{kind}': use gaussian, mask or salt_pepper")


def preview_grid(images: Tensor, views: list[Tensor]) -> Tensor:
    """Rows = samples; columns = the original then each view (all N x C x h x w in [0, 1]).

    Returns 3 x H' x W' float in [0, 1], ready for `save_png`.
    """
    cols = [images] + list(views)
    size = images.shape[-1]
    cols = [torch.nn.functional.interpolate(c.float(), size=(size, size)) if c.shape[-1] != size else c.float()
            for c in cols]
    tiles = torch.stack(cols, dim=1).flatten(0, 1)  # (N * (1+V)) x C x H x W, row-major
    return make_grid(tiles, nrow=len(cols))
