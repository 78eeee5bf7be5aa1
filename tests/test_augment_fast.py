"""The hand-written batched augmentation ops in sslpipe.augment: sampled parameters follow the
policy, each op matches torchvision's per-image function, identity settings are the identity,
and seeded runs repeat."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sslpipe import augment as aug
from sslpipe.config import resolve
from sslpipe.methods.shared import view_policy


def simclr_views(**over):
    return resolve({"simclr": {"views": over}})["simclr"]["views"]


@pytest.fixture(scope="module")
def cifar01(cifar_small):
    x = torch.from_numpy(np.load(cifar_small)["x_train"][:64]).permute(0, 3, 1, 2).contiguous()
    return aug.to_float(x)


@pytest.fixture
def images():  # smooth random images (real-looking gradients) in [0, 1], 3 x 16 x 16
    torch.manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(32, 3, 4, 4), size=16, mode="bilinear", align_corners=False)


# ---- crop + flip ----------------------------------------------------------------------------

@pytest.mark.parametrize("scale,ratio,hw", [((0.2, 1.0), (3 / 4, 4 / 3), (32, 32)),
                                            ((0.3, 0.6), (0.5, 2.0), (24, 40)),
                                            ((0.08, 1.0), (3 / 4, 4 / 3), (96, 96))])
def test_crop_areas_and_ratios_stay_in_range_and_boxes_inside(scale, ratio, hw):
    torch.manual_seed(0)
    h, w = hw
    box = aug.sample_crops(20000, h, w, scale, ratio)
    x0, y0, bw, bh = box.unbind(1)
    area, r = bw * bh / (h * w), bw / bh
    eps = 1e-4
    # torchvision's rule: if none of 10 draws fits, the whole image (its ratio is in range here)
    fallback = area > 1 - eps
    assert fallback.float().mean() < 0.01
    x0, y0, bw, bh, area, r = (t[~fallback] for t in (x0, y0, bw, bh, area, r))
    assert area.min() >= scale[0] - eps and area.max() <= scale[1] + eps
    assert r.min() >= ratio[0] - eps and r.max() <= ratio[1] + eps
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + bw <= w + eps).all() and (y0 + bh <= h + eps).all()
    assert area.std() > 0.05 and (x0.std() > 0 or y0.std() > 0)  # per sample
    if h == w:  # log-ratio uniform on its range; on a square image rejection is symmetric in it
        mid = (math.log(ratio[0]) + math.log(ratio[1])) / 2
        assert abs(r.log().mean().item() - mid) < 0.02


def test_crop_falls_back_to_torchvisions_central_crop_when_nothing_fits():
    torch.manual_seed(0)
    # a 4:1 image cannot hold a box of 90%+ of its area with aspect ratio <= 4/3
    box = aug.sample_crops(100, 8, 32, (0.9, 1.0), (3 / 4, 4 / 3))
    assert torch.allclose(box, torch.tensor([(32 - 8 * 4 / 3) / 2, 0.0, 8 * 4 / 3, 8.0]).expand(100, 4))


def test_whole_image_box_is_the_identity_and_flip_mirrors(images):
    n, _, h, w = images.shape
    whole = torch.tensor([0.0, 0.0, w, h]).expand(n, 4)
    no = torch.zeros(n, dtype=torch.bool)
    assert torch.allclose(aug.crop_flip(images, whole, no, 16), images, atol=1e-5)
    flip = torch.arange(n) % 2 == 0
    out = aug.crop_flip(images, whole, flip, 16)
    assert torch.allclose(out[flip], images[flip].flip(-1), atol=1e-5)
    assert torch.allclose(out[~flip], images[~flip], atol=1e-5)


def test_crop_of_a_pixel_aligned_box_at_its_own_size_is_the_slice(images):
    n = len(images)
    box = torch.tensor([3.0, 5.0, 8.0, 8.0]).expand(n, 4)
    out = aug.crop_flip(images, box, torch.zeros(n, dtype=torch.bool), 8)
    assert torch.allclose(out, images[:, :, 5:13, 3:11], atol=1e-5)


def test_crop_matches_torchvision_resized_crop_away_from_the_box_edge(cifar01):
    # torchvision crops, then resizes (clamping at the crop's edge); sslpipe samples the image
    # itself, so they agree except within a pixel of the box's border.
    x = cifar01[:8]
    box = torch.tensor([4.0, 6.0, 16.0, 16.0]).expand(8, 4)
    ours = aug.crop_flip(x, box, torch.zeros(8, dtype=torch.bool), 32)
    ref = torch.stack([TF.resized_crop(im, 6, 4, 16, 16, [32, 32], antialias=True) for im in x])
    assert torch.allclose(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5)


# ---- sampled parameters of the whole policy -------------------------------------------------

def sampled(n=20000, **over):
    torch.manual_seed(0)
    pipe = aug.view_pipeline(simclr_views(**over), 32)
    return pipe.sample(n, 32, 32, "cpu")


def test_flip_jitter_gray_blur_rates_follow_the_policy():
    p = sampled(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.1)
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.1)):
        assert abs(p[key].float().mean().item() - rate) < 0.02, key
    assert not p["flip"].equal(p["gray"])  # independent draws
    q = sampled(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    assert not q["flip"].any() and not q["jitter"].any() and not q["gray"].any() and not q["blur"].any()


def test_jitter_factors_stay_in_their_ranges_and_are_identity_when_not_applied():
    s = 0.5
    p = sampled(jitter_p=0.8, jitter_strength=s, blur_p=0.5)
    on = p["jitter"]
    bcs, hue = aug.JITTER_BCS * s, aug.JITTER_HUE * s
    for key in ("brightness", "contrast", "saturation"):
        f = p[key][on]
        assert f.min() >= 1 - bcs and f.max() <= 1 + bcs and f.std() > 0.1, key
        assert abs(f.mean().item() - 1) < 0.02
        assert (p[key][~on] == 1).all()
    h = p["hue"][on]
    assert h.min() >= -hue and h.max() <= hue and h.std() > 0.02
    assert (p["hue"][~on] == 0).all()
    # every sample applies the four ops in its own random order
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(len(on), 4))
    first = torch.bincount(p["order"][:, 0], minlength=4).float() / len(on)
    assert (first - 0.25).abs().max() < 0.02
    sig = p["sigma"]
    assert (sig[~p["blur"]] == 0).all()
    assert sig[p["blur"]].min() >= aug.BLUR_SIGMA[0] and sig[p["blur"]].max() <= aug.BLUR_SIGMA[1]


# ---- colour ops against torchvision's per-image functions -----------------------------------

def per_image(fn, x, factors):
    return torch.stack([fn(im, float(f)) for im, f in zip(x, factors)])


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation"])
def test_each_jitter_op_matches_torchvision(cifar01, op):
    x = cifar01
    n = len(x)
    torch.manual_seed(1)
    f = torch.empty(n).uniform_(0.2, 1.8)
    one, zero = torch.ones(n), torch.zeros(n)
    args = {"brightness": (f, one, one), "contrast": (one, f, one), "saturation": (one, one, f)}[op]
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[op]
    order = torch.arange(4).expand(n, 4)
    out = aug.color_jitter(x, *args, zero, order)
    assert torch.allclose(out, per_image(fn, x, f), atol=1e-5)


def test_jitter_applies_each_samples_order_with_clamping_like_torchvision(cifar01):
    x = cifar01
    n = len(x)
    torch.manual_seed(2)
    b, c, s = (torch.empty(n).uniform_(0.2, 1.8) for _ in range(3))
    order = torch.rand(n, 4).argsort(1)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    ref = []
    for i in range(n):
        y = x[i]
        for op in order[i].tolist():
            if op != aug.HUE:
                y = fns[op](y, float((b, c, s)[op][i]))
        ref.append(y)
    out = aug.color_jitter(x, b, c, s, torch.zeros(n), order)
    assert torch.allclose(out, torch.stack(ref), atol=1e-5)


def test_hue_rotation_keeps_luma_and_grey_and_turns_like_torchvision():
    n = 6
    torch.manual_seed(3)
    x = 0.4 + 0.2 * torch.rand(n, 3, 4, 4)  # mid-range, weakly saturated colours: no clamping
    one = torch.ones(n)
    order = torch.arange(4).expand(n, 4)
    h = torch.empty(n).uniform_(-0.5, 0.5)
    out = aug.color_jitter(x, one, one, one, h, order)
    luma = torch.tensor(aug._RGB2YIQ[0])
    # YIQ rotation: luma (Y) is unchanged, greys stay grey, a full turn is the identity
    assert torch.allclose(torch.einsum("nchw,c->nhw", out, luma), torch.einsum("nchw,c->nhw", x, luma), atol=1e-5)
    grey = torch.full((n, 3, 2, 2), 0.4)
    assert torch.allclose(aug.color_jitter(grey, one, one, one, h, order), grey, atol=1e-5)
    assert torch.allclose(aug.color_jitter(x, one, one, one, torch.ones(n), order), x, atol=1e-5)
    # direction as torchvision's HSV shift: a small positive hue takes red towards yellow
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    ours = aug.color_jitter(red, one[:1], one[:1], one[:1], torch.tensor([0.05]), order[:1])
    ref = TF.adjust_hue(red[0], 0.05)
    assert ours[0, 1] > red[0, 1] and ref[1] > red[0, 1]  # green rises in both
    assert ours[0, 2] <= red[0, 2] + 1e-6 and ref[2] <= red[0, 2] + 1e-6  # blue does not


def test_identity_jitter_is_exact(cifar01):
    n = len(cifar01)
    out = aug.color_jitter(cifar01, torch.ones(n), torch.ones(n), torch.ones(n), torch.zeros(n),
                           torch.rand(n, 4).argsort(1))
    assert torch.equal(out, cifar01)


def test_grayscale_matches_torchvision_on_chosen_samples_only(cifar01):
    mask = torch.arange(len(cifar01)) % 3 == 0
    out = aug.grayscale(cifar01, mask)
    assert torch.allclose(out[mask], TF.rgb_to_grayscale(cifar01[mask], 3), atol=1e-6)
    assert torch.equal(out[~mask], cifar01[~mask])


def test_blur_matches_torchvision_per_sigma_and_zero_sigma_is_identity(cifar01):
    x = cifar01[:16]
    torch.manual_seed(4)
    sigma = torch.empty(16).uniform_(*aug.BLUR_SIGMA)
    sigma[::4] = 0
    for k in (3, 5):
        out = aug.gaussian_blur(x, sigma, k)
        for i in range(16):
            ref = x[i] if sigma[i] == 0 else TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
            assert torch.allclose(out[i], ref, atol=1e-5)


def test_solarize_inverts_bright_pixels_of_chosen_samples(images):
    mask = torch.arange(len(images)) % 2 == 0
    out = aug.solarize(images, mask)
    assert torch.allclose(out[mask], TF.solarize(images[mask], 0.5))
    assert torch.equal(out[~mask], images[~mask])


# ---- the whole pipeline ---------------------------------------------------------------------

def test_identity_policy_is_the_identity_through_viewmaker():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    views = simclr_views(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], flip_p=0.0, jitter_p=0.0,
                         grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    out = aug.ViewMaker(view_policy("simclr", views, 16, n_views=2))(x)
    assert len(out) == 2 and all(torch.allclose(v, aug.to_float(x), atol=1e-5) for v in out)


def test_full_policy_output_range_dtype_and_seeded_repeat(cifar01):
    views = simclr_views(blur_p=0.5, solarize_p=0.2)
    maker = aug.ViewMaker(view_policy("simclr", views, 32, n_views=2))
    x = (cifar01 * 255).round().byte()
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the training loop: views stay fp32
        a = maker(x)
    params = {k: v.clone() for k, v in maker.pipeline.last_params.items()}
    torch.manual_seed(7)
    b = maker(x)
    torch.manual_seed(8)
    c = maker(x)
    for v in a:
        assert v.shape == x.shape and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1 and torch.isfinite(v).all()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    torch.manual_seed(7)
    maker(x)
    assert all(torch.equal(params[k], maker.pipeline.last_params[k]) for k in params)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert maker.pipeline.last_params["box"].shape == (2 * len(x), 4)  # both views' samples


def test_output_side_follows_image_size(images):
    out = aug.view_pipeline(simclr_views(), 8)(images)
    assert out.shape == (len(images), 3, 8, 8)
