import numpy as np
import pytest
import torch

from sslpipe import augment as aug
from sslpipe.config import resolve
from sslpipe.methods.shared import view_policy


def simclr_views(**over):
    return resolve({"simclr": {"views": over}})["simclr"]["views"]


def run_pipeline(views, x, seed=0):
    torch.manual_seed(seed)
    pipe = aug.view_pipeline(views, x.shape[-1])
    return pipe(x), pipe


def test_sampled_crop_areas_and_ratios_follow_the_config():
    # The boxes do not depend on the pixels: synthetic 32 px images serve as well as photos.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2000, 3, 32, 32), dtype=torch.uint8, generator=g)
    views = simclr_views(crop_scale=[0.3, 0.9], crop_ratio=[0.75, 1.3333])
    out, pipe = run_pipeline(views, aug.to_float(x))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    box = pipe.last_params["box"]  # N x 4: x0, y0, w, h in input pixels
    w, h = box[:, 2], box[:, 3]
    area = (w * h) / (32 * 32)
    # (Boxes are continuous; the tolerance is kept from integer boxes, which could stray a little.)
    assert area.min() >= 0.3 - 0.05 and area.max() <= 0.9 + 0.05
    assert area.std() > 0.1  # per-sample parameters, not one crop for the whole batch
    ratio = w / h
    assert ratio.min() >= 0.75 * 0.85 and ratio.max() <= 1.3333 / 0.85


def test_flip_rate_is_about_half_and_views_differ_per_sample():
    x = torch.rand(4000, 3, 8, 8)
    _, pipe = run_pipeline(simclr_views(flip_p=0.5), x)
    flipped = pipe.last_params["flip"].float().mean().item()
    assert 0.45 < flipped < 0.55
    _, pipe = run_pipeline(simclr_views(flip_p=0.0), x)
    assert pipe.last_params["flip"].float().sum() == 0


def test_views_are_seeded_and_reproducible():
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    maker = aug.ViewMaker(view_policy("simclr", simclr_views(), 16, n_views=2))
    torch.manual_seed(3)
    a = maker(x)
    torch.manual_seed(3)
    b = maker(x)
    torch.manual_seed(4)
    c = maker(x)
    assert len(a) == 2 and all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two independent views of the same images


def test_identity_policy_returns_the_images():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    views = simclr_views(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    out, _ = run_pipeline(views, aug.to_float(x))
    assert torch.allclose(out, aug.to_float(x), atol=1e-5)


def test_jigsaw_permutes_patches_and_inverts():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 12)
    patches, perm = aug.jigsaw(x, 3)
    assert patches.shape == (5, 9, 3, 4, 4)
    # patches[n, j] is the original patch perm[n, j] (row-major)
    for n in range(5):
        for j in range(9):
            r, c = divmod(int(perm[n, j]), 3)
            assert torch.equal(patches[n, j], x[n, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4])
    assert torch.equal(aug.unjigsaw(patches, perm), x)


@pytest.mark.parametrize("kind", ["gaussian", "mask", "salt_pepper"])
def test_corruptions_stay_in_range_and_change_the_image(kind):
    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16)
    y = aug.corrupt(x, kind, noise_std=0.3, mask_ratio=0.5, mask_patch=4, salt_pepper=0.2)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    changed = (y != x).float().mean().item()
    assert 0.1 < changed < 1.0 or kind == "gaussian"
    if kind == "mask":  # whole 4x4 patches are zeroed, about half of them
        blocks = y.reshape(32, 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(32, 16, -1)
        zero = (blocks == 0).all(-1).float().mean().item()
        assert 0.35 < zero < 0.65


def test_preview_grid_shape():
    x = torch.rand(4, 3, 16, 16)
    grid = aug.preview_grid(x, [x, x])
    # 4 rows x 3 columns of 16 px tiles with 2 px padding
    assert grid.shape == (3, 4 * 18 + 2, 3 * 18 + 2)


@pytest.mark.parametrize("k, nrow", [(6, 3), (7, 3), (2, 4)])
def test_make_grid_matches_torchvision_layout(k, nrow):
    """sslpipe.io.make_grid replaces torchvision.utils.make_grid (whose import costs a job ~1.5 s):
    same tiles, same padding, same places, also with a last row left incomplete or fewer tiles
    than a row. (One tile alone: torchvision returns it unframed, sslpipe frames it like any.)"""
    import torchvision.utils

    from sslpipe.io import make_grid

    tiles = torch.rand(k, 3, 5, 4)
    expected = torchvision.utils.make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)
    assert torch.equal(make_grid(tiles, nrow=nrow), expected)


def test_save_png_writes_an_enlarged_exact_picture(tmp_path):
    from PIL import Image

    from sslpipe.io import save_png

    img = torch.rand(3, 4, 5)
    save_png(img, tmp_path / "x.png", min_height=10)  # 4 px tall -> x3 (nearest) to reach 10
    arr = np.asarray(Image.open(tmp_path / "x.png"))
    assert arr.shape == (12, 15, 3)
    want = (img * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(arr[::3, ::3], want)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left behind
