"""Tests for the prepare stage (sslpipe.data) on real files: digits, npz, folder, cifar10 offline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sslpipe import data
from sslpipe.data import DataError, load_manifest, load_split, prepare

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SMALL = Path(__file__).resolve().parents[2] / "shared/data/cifar10_small.npz"
OUTPUTS = ("train.npz", "test.npz", "manifest.json")


def cfg(**overrides) -> dict:
    """A data: section with the schema's defaults, so tests see what stage code sees."""
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["data"]["properties"]
    return {**{k: v["default"] for k, v in props.items()}, **overrides}


def assert_fails_cleanly(c: dict, out: Path, *fragments: str) -> DataError:
    """prepare raises a DataError naming every fragment and leaves no output (not even temp files)."""
    with pytest.raises(DataError) as err:
        prepare(c, out)
    for frag in fragments:
        assert frag in str(err.value), f"{frag!r} not in {err.value}"
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    return err.value


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits16(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, prepare(cfg(image_size=16, test_fraction=0.25, split_seed=3), out)


def test_digits_arrays(digits16):
    out, m = digits16
    x, y = load_split(out, "train")
    xt, yt = load_split(out, "test")
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert x.shape == (len(y), 16, 16, 3) and xt.shape == (len(yt), 16, 16, 3)
    assert len(y) + len(yt) == 1797 and abs(len(yt) / 1797 - 0.25) < 0.01
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()  # grayscale replicated
    assert x.max() > 200  # 0..16 scaled to 0..255, not left at 0..16
    # Stratified: every class has ~25 % of its images in test.
    tr_c, te_c = np.bincount(y, minlength=10), np.bincount(yt, minlength=10)
    assert np.allclose(te_c / (tr_c + te_c), 0.25, atol=0.02)
    assert m["class_counts"] == {"train": tr_c.tolist(), "test": te_c.tolist()}


def test_digits_manifest(digits16):
    out, m = digits16
    assert load_manifest(out) == m
    assert m["dataset"] == "digits" and m["source"] == "digits" and m["path"] is None
    assert m["classes"] == [str(i) for i in range(10)] and m["num_classes"] == 10
    assert m["image_size"] == 16 and m["channels"] == 3 and m["split_seed"] == 3
    x, y = load_split(out, "train")
    assert m["counts"] == {"train": len(y), "test": len(load_split(out, "test")[1])}
    # mean/std match a direct float computation and are plausible for mostly-black digits.
    xf = x.astype(np.float64) / 255
    assert np.allclose(m["mean"], xf.mean(axis=(0, 1, 2)), atol=1e-9)
    assert np.allclose(m["std"], xf.std(axis=(0, 1, 2)), atol=1e-9)
    assert all(0.1 < v < 0.5 for v in m["mean"]) and all(0.1 < v < 0.5 for v in m["std"])


def test_digits_deterministic_and_seeded(digits16, tmp_path):
    _, m = digits16
    again = prepare(cfg(image_size=16, test_fraction=0.25, split_seed=3), tmp_path / "a")
    assert again["sha256"] == m["sha256"]
    other = prepare(cfg(image_size=16, test_fraction=0.25, split_seed=4, name="digits_s4"), tmp_path / "b")
    assert other["sha256"]["train"] != m["sha256"]["train"] and other["dataset"] == "digits_s4"
    assert data.dataset_name(cfg(name="x")) == "x" and data.dataset_name(cfg()) == "digits"


def test_digits_native_size_is_lossless(tmp_path):
    from sklearn.datasets import load_digits
    prepare(cfg(image_size=8), tmp_path)
    x, _ = load_split(tmp_path, "train")
    assert x.shape[1:] == (8, 8, 3)
    expected = np.unique(np.round(load_digits().images * 255 / 16))
    assert set(np.unique(x)) <= set(expected.astype(np.uint8))


# ----------------------------------------------------------------------------- npz
needs_cifar = pytest.mark.skipif(not CIFAR_SMALL.is_file(), reason=f"shared test data missing: {CIFAR_SMALL}")


@needs_cifar
def test_npz_cifar_balanced_subsets(tmp_path):
    m = prepare(cfg(source="npz", path=str(CIFAR_SMALL), name="cifar10_small",
                    max_train=205, max_test=50, split_seed=1), tmp_path)
    x, y = load_split(tmp_path, "train")
    xt, yt = load_split(tmp_path, "test")
    assert x.shape == (205, 32, 32, 3) and xt.shape == (50, 32, 32, 3)
    assert sorted(np.bincount(y, minlength=10)) == [20] * 5 + [21] * 5  # balanced, remainder spread
    assert np.bincount(yt, minlength=10).tolist() == [5] * 10
    assert m["classes"][:3] == ["airplane", "automobile", "bird"] and m["dataset"] == "cifar10_small"
    # The subset is of real rows: every kept image equals one in the source with its label.
    with np.load(CIFAR_SMALL) as z:
        src_x, src_y = z["x_train"], z["y_train"]
    flat = {row.tobytes(): int(lab) for row, lab in zip(src_x, src_y)}
    assert all(flat[img.tobytes()] == lab for img, lab in zip(x, y))
    assert (m["mean"][2] < m["mean"][0]) and all(0.3 < v < 0.6 for v in m["mean"])  # CIFAR: blue lowest
    other = prepare(cfg(source="npz", path=str(CIFAR_SMALL), max_train=205, max_test=50, split_seed=2),
                    tmp_path / "s2")
    assert other["sha256"]["train"] != m["sha256"]["train"]


@needs_cifar
def test_npz_resize_and_oversized_max(tmp_path):
    prepare(cfg(source="npz", path=str(CIFAR_SMALL), image_size=16, max_train=20, max_test=10**6), tmp_path)
    x, y = load_split(tmp_path, "train")
    xt, _ = load_split(tmp_path, "test")
    assert x.shape == (20, 16, 16, 3) and len(xt) == 1000  # max larger than available keeps all


def write_npz(path: Path, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8),
              "y_train": np.arange(12) % 3,
              "x_test": rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8),
              "y_test": np.arange(6) % 3,
              "classes": np.array(["a", "b", "c"])}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_small_valid_and_grayscale(tmp_path):
    f = write_npz(tmp_path / "ok.npz", x_train=np.full((12, 10, 10), 7, np.uint8), y_train=np.arange(12) % 3)
    m = prepare(cfg(source="npz", path=str(f), image_size=8), tmp_path / "out")
    x, y = load_split(tmp_path / "out", "train")
    assert x.shape == (12, 8, 8, 3) and (x == 7).all()  # resize keeps a constant image constant
    assert m["classes"] == ["a", "b", "c"] and m["class_counts"]["test"] == [2, 2, 2]


@pytest.mark.parametrize("override, fragments", [
    ({"y_test": None}, ["y_test", "missing"]),
    ({"x_train": np.zeros((12, 10, 10, 3), np.float32)}, ["x_train", "float32", "uint8"]),
    ({"x_test": np.zeros((6, 10, 10, 4), np.uint8)}, ["x_test", "(6, 10, 10, 4)"]),
    ({"y_train": np.full(12, 3)}, ["y_train", "labels"]),
    ({"y_test": np.full(6, -1)}, ["y_test", "-1"]),
    ({"y_train": np.zeros(11, np.int64)}, ["y_train", "12"]),
    ({"y_train": np.zeros(12, np.float64)}, ["y_train", "integer"]),
    ({"x_test": np.zeros((0, 10, 10, 3), np.uint8), "y_test": np.zeros(0, np.int64)}, ["x_test", "empty"]),
])
def test_npz_bad_contents(tmp_path, override, fragments):
    f = write_npz(tmp_path / "bad.npz", **override)
    assert_fails_cleanly(cfg(source="npz", path=str(f)), tmp_path / "out", str(f), *fragments)


def test_npz_truncated_and_missing(tmp_path):
    good = write_npz(tmp_path / "good.npz")
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_fails_cleanly(cfg(source="npz", path=str(trunc)), tmp_path / "o1", str(trunc), "not a valid .npz")
    missing = tmp_path / "nope.npz"
    assert_fails_cleanly(cfg(source="npz", path=str(missing)), tmp_path / "o2", str(missing), "does not exist")
    assert_fails_cleanly(cfg(source="npz"), tmp_path / "o3", "data.path", "required")


# ----------------------------------------------------------------------------- folder
COLORS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


def make_tree(root: Path, per_class: int, size: int = 20) -> None:
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ext, mode = (".png", "RGB") if i % 2 else (".jpg", "L")  # mixed formats and modes
            img = Image.new("RGB", (size + i, size), rgb)
            (img.convert(mode) if mode == "L" else img).save(root / name / f"{i}{ext}")


def test_folder_train_test_layout(tmp_path):
    make_tree(tmp_path / "img/train", 4)
    make_tree(tmp_path / "img/test", 2)
    (tmp_path / "img/train/red/notes.txt").write_text("ignored: not an image extension")
    m = prepare(cfg(source="folder", path=str(tmp_path / "img"), image_size=12), tmp_path / "out")
    x, y = load_split(tmp_path / "out", "train")
    assert m["classes"] == ["blue", "green", "red"] and m["counts"] == {"train": 12, "test": 6}
    assert x.shape == (12, 12, 12, 3) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    png = x[y == 2][1::2]  # odd indices are RGB pngs: pure red survives decoding and resize
    assert (png[..., 0] == 255).all() and (png[..., 1:] == 0).all()


def test_folder_single_tree_split(tmp_path):
    make_tree(tmp_path / "img", 10)
    m = prepare(cfg(source="folder", path=str(tmp_path / "img"), image_size=8, test_fraction=0.3),
                tmp_path / "out")
    assert m["class_counts"] == {"train": [7, 7, 7], "test": [3, 3, 3]}
    assert load_split(tmp_path / "out", "test")[0].shape == (9, 8, 8, 3)


def test_folder_errors(tmp_path):
    make_tree(tmp_path / "img", 3)
    bad = tmp_path / "img/green/broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    assert_fails_cleanly(cfg(source="folder", path=str(tmp_path / "img")), tmp_path / "o1", str(bad))
    bad.unlink()
    (tmp_path / "img/empty").mkdir()
    assert_fails_cleanly(cfg(source="folder", path=str(tmp_path / "img")), tmp_path / "o2",
                         str(tmp_path / "img/empty"), "empty class")


def test_folder_needs_both_split_dirs(tmp_path):
    make_tree(tmp_path / "img/train", 2)
    assert_fails_cleanly(cfg(source="folder", path=str(tmp_path / "img")), tmp_path / "o", "test/")


def test_folder_class_mismatch(tmp_path):
    make_tree(tmp_path / "img/train", 2)
    make_tree(tmp_path / "img/test", 2)
    (tmp_path / "img/test/yellow").mkdir()
    Image.new("RGB", (8, 8), (255, 255, 0)).save(tmp_path / "img/test/yellow/0.png")
    assert_fails_cleanly(cfg(source="folder", path=str(tmp_path / "img")), tmp_path / "o", "yellow", "differ")


# ----------------------------------------------------------------------------- torchvision / misc
@pytest.mark.parametrize("source, folder", [("cifar10", "cifar-10-batches-py"), ("stl10", "stl10_binary")])
def test_torchvision_offline_absent(tmp_path, source, folder):
    empty = tmp_path / "cache"
    empty.mkdir()
    assert_fails_cleanly(cfg(source=source, path=str(empty)), tmp_path / "out",
                         str(empty), "data.download", folder)
    assert list(empty.iterdir()) == []  # nothing was downloaded


def test_failed_write_publishes_nothing(tmp_path):
    """If the second array cannot be written, the first must not appear either (nor the manifest)."""
    out = tmp_path / "out"
    (out / "test.npz").mkdir(parents=True)  # os.replace onto a directory fails after train is written
    with pytest.raises(OSError):
        prepare(cfg(image_size=8), out)
    assert sorted(p.name for p in out.iterdir()) == ["test.npz"]  # no train.npz, manifest, temp files


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="prepare"):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="split"):
        load_split(tmp_path, "val")
    with pytest.raises(DataError, match="prepare"):
        load_manifest(tmp_path)


def test_balanced_subset_uneven_classes():
    y = np.array([0] * 50 + [1] * 3 + [2] * 20)
    idx = data.balanced_subset(y, 30, seed=0)
    assert len(idx) == 30 and len(set(idx)) == 30 and (np.diff(idx) > 0).all()
    assert np.bincount(y[idx]).tolist() in ([14, 3, 13], [13, 3, 14])  # small class gives all it has
    assert (data.balanced_subset(y, 30, seed=0) == idx).all()
    assert not (data.balanced_subset(y, 30, seed=1) == idx).all()
