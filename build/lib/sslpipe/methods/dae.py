"""Denoising autoencoder (Vincent et al. 2008, "Extracting and Composing Robust Features with
Denoising Autoencoders"; masking as in He et al. 2022, "Masked Autoencoders Are Scalable
Vision Learners").

Each clean view x is corrupted to x~ ~ q(x~ | x) (Gaussian noise, masked patches or salt and
pepper), encoded to y = f(x~) and decoded to z = g(y); the loss is the squared reconstruction
error L(x, z) = ||x - z||^2 against the *clean* x. The decoder reads only the pooled feature
vector that evaluation uses, so that vector must carry the image.

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

from sslpipe.augment import ViewMaker, corrupt, to_float
from sslpipe.io import atomic_path, make_grid, save_png
from sslpipe.methods.shared import view_policy
from sslpipe.models import Encoder

DECODER_WIDTH = 32  # channels at the decoder's coarsest map, halved per upsampling (>= 16): small, as in MAE
ENERGY_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)  # Gaussian noise levels of the energy curve
GRID_IMAGES = 8


def reconstruction_error(z: Tensor, x: Tensor) -> Tensor:
    """Squared error L(x, z) = ||x - z||^2 (Vincent et al. 2008, sec. 2.2), averaged over pixels.

    z: N x C x H x W reconstruction, x: N x C x H x W clean target, both in [0, 1].
    """
    return (z.float() - x.float()).pow(2).mean()


class Decoder(nn.Module):
    """g: feature vector -> image. Linear to a coarse s x s map, then (nearest upsample x2,
    3x3 conv) stages; upsample + conv rather than transposed convs avoids checkerboard
    artefacts (Odena et al. 2016). Any image_size >= 8 works: s = ceil(size / 2^stages),
    and the logits are resized to the exact size before the sigmoid."""

    def __init__(self, feat_dim: int, image_size: int, width: int = DECODER_WIDTH):
        super().__init__()
        # Two stages up to 32 px; more for larger images so the linear layer stays small.
        stages = max(2, math.ceil(math.log2(image_size / 8)))
        self.image_size, self.width = image_size, width
        self.s = math.ceil(image_size / 2 ** stages)
        self.fc = nn.Linear(feat_dim, width * self.s * self.s)
        layers: list[nn.Module] = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
        for _ in range(stages):
            c_out = max(16, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c = c_out
        layers.append(nn.Conv2d(c, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, y: Tensor) -> Tensor:  # y: N x feat_dim -> N x 3 x size x size in [0, 1]
        logits = self.net(self.fc(y).view(-1, self.width, self.s, self.s))
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return torch.sigmoid(logits)


class DAE(nn.Module):
    name = "dae"

    @staticmethod
    def policy(cfg: dict, image_size: int) -> dict:
        corruption = {"kind": cfg["corruption"], "noise_std": cfg["noise_std"], "mask_ratio": cfg["mask_ratio"],
                      "mask_patch": cfg["mask_patch"], "salt_pepper": cfg["salt_pepper"]}
        return view_policy("dae", cfg["views"], image_size, n_views=1, corruption=corruption)

    @staticmethod
    def preview(policy: dict, x: Tensor) -> list[Tensor]:
        v = ViewMaker(policy)(x, 1)[0]
        return [v, corrupt(v, **policy["corruption"])]

    def __init__(self, encoder: Encoder, cfg: dict, policy: dict, num_train: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = Decoder(encoder.feat_dim, policy["image_size"])
        self.views = ViewMaker(policy)
        self.corruption = dict(policy["corruption"])  # from the validated policy, not cfg

    def reconstruct(self, x_tilde: Tensor) -> Tensor:
        """z = g(f(x~)): N x 3 x H x W in [0, 1] -> N x 3 x H x W in [0, 1]."""
        return self.decoder(self.encoder(x_tilde))

    def loss(self, x: Tensor, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        v = self.views(x, 1)[0]                        # clean view: N x 3 x H x W
        v_tilde = corrupt(v, **self.corruption)        # x~ ~ q(x~ | x)
        loss = reconstruction_error(self.reconstruct(v_tilde), v)
        with torch.no_grad():  # the error of returning the corrupted input: the loss should end below it
            identity = reconstruction_error(v_tilde, v)
        return loss, {"mse_identity": identity}

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def diagnostics(self, x: Tensor, out_dir: str | Path) -> dict[str, float]:
        """Energy F(y) = ||y - g(f(y))||^2 of y = clip(x + sigma * eps), per noise level sigma
        (a curve that rises with distance from the data), plus a reconstruction grid.

        Writes dae_energy_vs_corruption.png and dae_reconstructions.png into out_dir.
        """
        out_dir = Path(out_dir)
        was_training = self.training
        self.eval()
        x01 = to_float(x) if x.dtype == torch.uint8 else x.float()
        energies = []
        for sigma in ENERGY_SIGMAS:  # a handful of noise levels, each a batched forward
            y = corrupt(x01, "gaussian", noise_std=sigma)
            energies.append(reconstruction_error(self.reconstruct(y), y))
        x8 = x01[:GRID_IMAGES]
        x8_tilde = corrupt(x8, **self.corruption)
        z8 = self.reconstruct(x8_tilde)
        denoise = reconstruction_error(z8, x8)
        values = torch.stack(energies + [denoise]).tolist()  # one host sync
        self.train(was_training)

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _reconstruction_grid(x_tilde: Tensor, z: Tensor, x: Tensor, path: Path) -> None:
    """Rows: corrupted, reconstructed, clean (one column per image), upscaled for small images."""
    tiles = torch.cat([x_tilde, z, x]).float().cpu()
    scale = max(1, 64 // tiles.shape[-1])  # 16 px digits would be unreadable at 1:1
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    save_png(make_grid(tiles, nrow=len(x)), path)
