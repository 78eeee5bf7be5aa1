"""Denoising autoencoder (Vincent et al. 2008, "Extracting and Composing Robust Features with
Denoising Autoencoders"; masking as in He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners").

Each clean view x is corrupted to x~ ~ q(x~ | x), encoded and decoded to z = g(f(x~)); the loss
is the squared error against the *clean* x. The default follows MAE (He et al. 2022) on a CNN,
as in context encoders (Pathak et al. 2016): q masks a random 75 % of 8 x 8 patches, filled with
the data mean (0 after the encoder's normalisation: a CNN cannot drop tokens as MAE's ViT does);
g reads the encoder's last *spatial* map (`models.spatial_features`), not only the pooled vector;
the loss is on masked pixels only (`visible_weight` 0) against per-patch normalised pixels
(`norm_target`). Measured on a 5,000-image CIFAR-10 subset (small CNN, 30 epochs, seed 0,
linear top-1; random init 44.3 %): pooled-vector decoder with 50 % of 4 px patches 43.3 %,
spatial decoder 43.9 %, + 75 % of 8 px patches 46.0 %, + normalised target 46.5 %.
Departures from MAE: a CNN encoder sees the mask-filled image, and a small conv decoder
(upsample + conv stages) replaces the Transformer decoder. `gaussian` and `salt_pepper` are the
classic denoising corruptions (Vincent et al. 2008/2010), weighed on every pixel.

`objective: hybrid` adds the contrastive term of masked contrastive learning (MACRL, Yao et al.
2022, "Masked Contrastive Representation Learning"; CMAE, Huang et al. 2022): two augmented views
of each image are corrupted and encoded in one forward, each reconstructs its own clean view,
and SimCLR's NT-Xent (`nt_xent`) over a projection of their pooled features pulls the pair
together: L = L_rec + nce_weight L_nce. Departures from MACRL: both views get the same
corruption (MACRL corrupts one branch harder), squared error instead of L1, in-batch negatives
instead of a memory bank. config/cifar10-cpu.yaml runs it: no reconstruction-only variant
cleared the random-init encoder's linear top-1 there (see that file). `objective` goes into
summary.json and the report.

In the energy-based view (LeCun's NYU Deep Learning notes, where y names an input image),
F(y) = ||y - g(f(y))||^2 is an energy: low on the data manifold, rising with distance from
it; `diagnostics` plots it against the strength of Gaussian noise added to the data.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslpipe.augment import ViewMaker, ViewPipeline, corrupt, patch_mask, to_float
from sslpipe.io import make_grid, save_figure, save_png
from sslpipe.methods.shared import view_policy
from sslpipe.methods.simclr import global_views, nt_xent
from sslpipe.models import Encoder, eval_mode, mlp_head, spatial_features

ENERGY_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)  # Gaussian noise levels of the energy curve
GRID_IMAGES = 8


def reconstruction_error(z: Tensor, x: Tensor, weight: Tensor | None = None) -> Tensor:
    """Squared error L(x, z) = ||x - z||^2 (Vincent et al. 2008, sec. 2.2), averaged over the
    pixels `weight` selects: sum_p w_p ||x_p - z_p||^2 / (C sum_p w_p), the plain mean when None.
    With w = the mask it is MAE's loss on masked patches only (He et al. 2022, sec. 3).

    z: N x C x H x W reconstruction, x: N x C x H x W target, weight: N x 1 x H x W (>= 0).
    """
    err = (z.float() - x.float()).pow(2)                          # N x C x H x W
    if weight is None:
        return err.mean()
    w = weight.float()
    return (err * w).sum() / (w.sum() * err.shape[1]).clamp_min(1e-12)


def patch_stats(x: Tensor, patch: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Mean and std over pixels and channels of each patch x patch cell (the last row/column cut
    to fit), broadcast back to every pixel: x N x C x H x W -> two N x 1 x H x W."""
    h, w = x.shape[-2:]
    x = x.float()

    def per_cell(t: Tensor) -> Tensor:  # N x 1 x H x W -> the cell's mean at every pixel
        m = F.avg_pool2d(t, patch, ceil_mode=True)
        return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
    mean = per_cell(x.mean(1, keepdim=True))
    var = (per_cell(x.pow(2).mean(1, keepdim=True)) - mean.pow(2)).clamp_min(0)
    return mean, (var + eps).sqrt()


def patch_normalised(x: Tensor, patch: int) -> Tensor:
    """MAE's normalised-pixel target (He et al. 2022, sec. 3): each patch minus its mean over its
    std. x: N x C x H x W -> N x C x H x W."""
    mean, std = patch_stats(x, patch)
    return (x.float() - mean) / std


class Decoder(nn.Module):
    """g: the encoder's spatial map N x D x s x s (or, `pooled`, its pooled N x D vector spread
    over s x s by a linear layer) -> image. A 1x1 conv to `width` channels, then (nearest upsample
    x2, 3x3 conv) stages until the image size; upsample + conv rather than transposed convs avoids
    checkerboard artefacts (Odena et al. 2016). Small, as in MAE, so the encoder does the work."""

    def __init__(self, feat_dim: int, image_size: int, width: int = 64, pooled: bool = False,
                 out_sigmoid: bool = True):
        super().__init__()
        self.image_size, self.pooled, self.out_sigmoid, self.width = image_size, pooled, out_sigmoid, width
        self.s = math.ceil(image_size / 8)                         # the encoder's map: stride 8
        stages = max(1, math.ceil(math.log2(image_size / self.s)))
        self.fc = nn.Linear(feat_dim, width * self.s * self.s) if pooled else nn.Conv2d(feat_dim, width, 1)
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
        for _ in range(stages):
            c_out = max(16, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c = c_out
        layers.append(nn.Conv2d(c, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, y: Tensor) -> Tensor:  # y: N x D x s x s (or N x D) -> N x 3 x size x size
        h = self.fc(y).view(-1, self.width, self.s, self.s) if self.pooled else self.fc(y)
        logits = self.net(h)
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return torch.sigmoid(logits) if self.out_sigmoid else logits


def colour_pipeline(policy: dict) -> ViewPipeline | None:
    """The colour part of q (jitter, grayscale; `colour_corruption`), None when off: the input
    loses its colours, the target keeps them, so g(f(.)) must colourise as well as inpaint
    (Zhang et al. 2016, "Colorful Image Colorization", a pretext whose features probe linearly
    better than inpainting's). Same image geometry: a whole-image box, no flip."""
    colour = policy.get("colour_corruption") or {}
    if not (colour.get("jitter_p", 0) > 0 or colour.get("grayscale_p", 0) > 0):
        return None
    views = {**policy["views"], "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_p": 0.0,
             "blur_p": 0.0, "solarize_p": 0.0, **colour}
    return ViewPipeline(views, policy["image_size"])


class DAE(nn.Module):
    name = "dae"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        corruption = {"kind": cfg["corruption"], "noise_std": cfg["noise_std"], "mask_ratio": cfg["mask_ratio"],
                      "mask_patch": cfg["mask_patch"], "salt_pepper": cfg["salt_pepper"]}
        return view_policy("dae", cfg["views"], image_size, n_views=2 if cfg["objective"] == "hybrid" else 1,
                           corruption=corruption,
                           colour_corruption=dict(cfg["colour_corruption"]))

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        v = ViewMaker(policy)(x, 1)[0]
        colour = colour_pipeline(policy)
        return [v, corrupt(colour(v) if colour else v, **policy["corruption"], fill=0.5)]

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        self.pooled = cfg["decoder"] == "pooled"
        self.norm_target = cfg["norm_target"]
        self.visible_weight = cfg["visible_weight"]
        self.decoder = Decoder(encoder.feat_dim, policy["image_size"], cfg["decoder_width"], self.pooled,
                               out_sigmoid=not self.norm_target)
        self.views = ViewMaker(policy)
        self.corruption = dict(policy["corruption"])  # from the validated policy, not cfg
        self.colour = colour_pipeline(policy)
        self.hybrid = cfg["objective"] == "hybrid"
        self.objective = "reconstruction + nce_weight x NT-Xent of two corrupted views" if self.hybrid else "reconstruction"
        if self.hybrid:  # g: pooled features -> the NT-Xent embedding
            self.head = mlp_head(encoder.feat_dim, cfg["proj_hidden"], cfg["proj_dim"])
            self.temperature, self.nce_weight = cfg["temperature"], cfg["nce_weight"]

    def corrupt(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """x~ ~ q(x~ | x) and the loss weight per pixel (N x 1 x H x W): for `mask`, masked patches
        are set to the data mean (0 after the encoder's normalisation) and weigh 1, kept pixels
        `visible_weight`; the other corruptions weigh every pixel 1."""
        c = self.corruption
        n, _, h, w = v.shape
        if self.colour is not None:  # colour corruption of the input only; the target stays v
            v = self.colour(v)
        if c["kind"] != "mask":
            return corrupt(v, **c), torch.ones(n, 1, h, w, device=v.device)
        masked = patch_mask(n, h, w, c["mask_ratio"], c["mask_patch"], v.device)
        v_tilde = torch.where(masked, self.encoder.mean.to(v.dtype), v)
        weight = masked.float() + self.visible_weight * (~masked).float()
        return v_tilde, weight

    def reconstruct(self, x_tilde: Tensor) -> Tensor:
        """z = g(f(x~)): N x 3 x H x W in [0, 1] -> N x 3 x H x W (in [0, 1], or in per-patch
        normalised units with norm_target)."""
        return self.decode(spatial_features(self.encoder, x_tilde))

    def decode(self, h: Tensor) -> Tensor:  # h: N x D x s x s, the encoder's map -> N x 3 x H x W
        return self.decoder(h.mean((2, 3)) if self.pooled else h)  # the map's mean is f's pooled output

    def target(self, v: Tensor) -> Tensor:
        return patch_normalised(v, self.corruption["mask_patch"]) if self.norm_target else v

    def to_pixels(self, z: Tensor, ref: Tensor) -> Tensor:
        """A reconstruction in pixel space: with norm_target, z de-normalised with the patch
        statistics of `ref` (as MAE's figures do), clipped to [0, 1]."""
        if not self.norm_target:
            return z
        mean, std = patch_stats(ref, self.corruption["mask_patch"])
        return (z * std + mean).clamp(0, 1)

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v = torch.cat(self.views(x))                   # clean views: kN x 3 x H x W (the policy's k views)
        v_tilde, weight = self.corrupt(v)              # x~ ~ q(x~ | x), weight: kN x 1 x H x W
        h = spatial_features(self.encoder, v_tilde)    # h: kN x D x s x s, one forward (BN sees all views)
        l_rec = reconstruction_error(self.decode(h), self.target(v), weight)
        with torch.no_grad():  # the error of returning the corrupted input: the loss should end below it
            logs = {"mse_identity": reconstruction_error(v_tilde, v, weight)}
        if not self.hybrid:
            return l_rec, logs
        z1, z2 = self.head(h.mean((2, 3))).chunk(2)   # z1, z2: N x proj_dim, the two views
        l_nce = nt_xent(z1, z2, self.temperature, *global_views(z1, z2))
        return l_rec + self.nce_weight * l_nce, {**logs, "l_rec": l_rec.detach(), "l_nce": l_nce.detach()}

    @torch.no_grad()
    def diagnostics(self, x: Tensor, out_dir: str | Path) -> dict[str, float]:
        """Energy F(y) = ||y - g(f(y))||^2 of y = clip(x + sigma * eps), per noise level sigma
        (a curve that rises with distance from the data), plus a reconstruction grid; both in
        pixels (`to_pixels`), and `dae_denoise_mse` on the pixels the loss weighs.

        Writes dae_energy_vs_corruption.png and dae_reconstructions.png into out_dir.
        """
        out_dir = Path(out_dir)
        with eval_mode(self):
            x01 = to_float(x) if x.dtype == torch.uint8 else x.float()
            energies = []
            for sigma in ENERGY_SIGMAS:  # a handful of noise levels, each a batched forward
                y = corrupt(x01, "gaussian", noise_std=sigma)
                energies.append(reconstruction_error(self.to_pixels(self.reconstruct(y), y), y))
            x8 = x01[:GRID_IMAGES]
            x8_tilde, w8 = self.corrupt(x8)
            z8 = self.to_pixels(self.reconstruct(x8_tilde), x8)
            denoise = reconstruction_error(z8, x8, w8)
            values = torch.stack(energies + [denoise]).tolist()  # one host sync

        metrics = {f"dae_energy_sigma_{s:g}": e for s, e in zip(ENERGY_SIGMAS, values)}
        metrics["dae_denoise_mse"] = values[-1]
        _energy_plot(list(ENERGY_SIGMAS), values[:-1], out_dir / "dae_energy_vs_corruption.png")
        _reconstruction_grid(x8_tilde, z8, x8, out_dir / "dae_reconstructions.png")
        return metrics


def _energy_plot(sigmas: list[float], energies: list[float], path: Path) -> None:
    # Figure (not pyplot) keeps no global state and needs no GUI backend: safe in worker jobs.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    ax.plot(sigmas, energies, marker="o")
    ax.set_xlabel(r"Gaussian noise std $\sigma$ of $y = x + \sigma\epsilon$")
    ax.set_ylabel(r"energy $\Vert y - g(f(y))\Vert^2$ per pixel")
    ax.set_title("DAE energy vs distance from the data")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _reconstruction_grid(x_tilde: Tensor, z: Tensor, x: Tensor, path: Path) -> None:
    """Rows: corrupted, reconstructed, clean (one column per image), upscaled for small images."""
    tiles = torch.cat([x_tilde, z, x]).float().cpu()
    scale = max(1, 64 // tiles.shape[-1])  # 16 px digits would be unreadable at 1:1
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    save_png(make_grid(tiles, nrow=len(x)), path)
