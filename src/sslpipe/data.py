"""The prepare stage: load a dataset once into compact uint8 arrays plus a manifest.

Writes to out_dir: ``train.npz`` / ``test.npz`` with ``x`` uint8 (N, S, S, 3), S =
``data.image_size`` (grayscale replicated to 3 channels), and ``y`` int64 (N,) class indices;
then ``manifest.json`` (classes, counts, per-channel train ``mean``/``std`` in [0, 1] that
training normalises with, ``sha256`` of x + y bytes per split, ...). Sources: ``digits``
(scikit-learn, offline), ``cifar10``/``cifar100``/``stl10`` (torchvision cache at data.path or
data/<source>), ``folder`` (ImageFolder: ``path/{train,test}/<class>/*`` or one ``path/<class>/*``
tree split by test_fraction) and ``npz`` (x_train, y_train, x_test, y_test, optional classes).
max_train/max_test take class-balanced seeded subsets. Everything is loaded and checked before
the first write, and writes go through `atomic_path`, so a failed or killed run leaves no
complete-looking file.
"""
from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .io import atomic_path, read_json, write_json

SPLITS = ("train", "test")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMG_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
# torchvision class name and the extracted folder it expects inside the root directory.
TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-batches-py"),
               "cifar100": ("CIFAR100", "cifar-100-python"),
               "stl10": ("STL10", "stl10_binary")}
RESIZE_CHUNK = 2048  # images per interpolate call: bounds the float32 copy (STL10 at 96 px)


class DataError(ValueError):
    """Bad data input; the message names the config key or file and what to do."""


def dataset_name(data_cfg: dict) -> str:
    """The one name of a dataset (manifest, MLflow tag, report title): data.name, else its source."""
    return data_cfg.get("name") or data_cfg["source"]


# ----------------------------------------------------------------------------- public API
def prepare(data_cfg: dict, out_dir: str | Path) -> dict:
    """Load `data_cfg`'s dataset, write out_dir/{train,test}.npz and manifest.json; return the manifest."""
    source = data_cfg["source"]
    if source not in LOADERS:
        raise DataError(f"data.source: unknown source {source!r}; use one of {sorted(LOADERS)}")
    found = check_source(data_cfg)
    if found:
        raise DataError("\n".join(f"{key}: {text}" for key, text in found))
    size, seed = data_cfg["image_size"], data_cfg["split_seed"]
    x_tr, y_tr, x_te, y_te, classes = LOADERS[source](data_cfg)
    loaded = {"train": (x_tr, y_tr, data_cfg["max_train"]),
              "test": (x_te, y_te, data_cfg["max_test"])}
    splits = {}  # split -> (x (N,size,size,3) uint8, y (N,) int64); subset first, resize only what is kept
    for i, (split, (x, y, max_n)) in enumerate(loaded.items()):
        keep = balanced_subset(y, max_n, seed + i)
        if len(keep) == 0:
            raise DataError(f"data.source={source}: the {split} split is empty; check data.path")
        splits[split] = (_resize(_to_rgb(x[keep]), size), y[keep].astype(np.int64))
    manifest = _manifest(data_cfg, classes, splits)
    out_dir = Path(out_dir)
    # Both arrays become visible only if both writes succeed; the manifest goes last and marks completion.
    with atomic_path(out_dir / "train.npz") as tmp_tr, atomic_path(out_dir / "test.npz") as tmp_te:
        np.savez(tmp_tr, x=splits["train"][0], y=splits["train"][1])
        np.savez(tmp_te, x=splits["test"][0], y=splits["test"][1])
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (x uint8 (N,H,W,3), y int64 (N,)) of a prepared split."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first")
    redo = ("rebuild it with `snakemake --forcerun prepare` (or `sslpipe prepare` by hand)")
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"].astype(np.int64, copy=False)
    except Exception as exc:  # truncated (BadZipFile), a key missing, not an npz at all
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc}); {redo}") from None
    # Verified against the manifest that prepare wrote beside it (sha256 of the arrays' bytes;
    # ~30 ms for 5,000 CIFAR images): a replaced or edited file never trains or scores silently.
    want = (load_manifest(data_dir).get("sha256") or {}).get(split) if (Path(data_dir) / "manifest.json").is_file() else None
    if want is not None and _sha256(x, y) != want:
        raise DataError(f"{path}: its arrays do not match {Path(data_dir) / 'manifest.json'} (sha256 differs: "
                        f"the file changed after prepare); {redo}")
    return x, y


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the prepare stage first")
    return read_json(path)


# ----------------------------------------------------------------------------- cheap checks
def check_source(data_cfg: dict) -> list[tuple[str, str]]:
    """(config key, problem) for each problem of the data a config points at, found cheaply
    before any job runs: data.path exists and has the right kind; an npz's keys, shapes and
    dtypes from its arrays' headers (not its pixels), its labels' range and classes without a
    training image; an ImageFolder's class directories; a torchvision cache (without download)."""
    source = data_cfg["source"]
    try:
        if source == "npz":
            return _check_npz(_input_path(data_cfg, want_dir=False), data_cfg)
        if source == "folder":
            return _check_folder(_input_path(data_cfg, want_dir=True))
        if source in TORCHVISION and not data_cfg["download"]:
            root = Path(data_cfg["path"] or f"data/{source}")
            folder = TORCHVISION[source][1]
            if not (root / folder).is_dir():
                return [("data.path", f"no {folder}/ in {root} and data.download is false: set "
                                      f"data.download: true where internet is available, or place the "
                                      f"extracted torchvision folder {folder}/ in {root}")]
    except DataError as e:
        return [("data.path", str(e).removeprefix("data.path: "))]
    return []


def _npy_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one .npy member, read from its header only."""
    with zf.open(name) as fh:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def _check_npz(path: Path, data_cfg: dict) -> list[tuple[str, str]]:
    if not zipfile.is_zipfile(path):
        return [("data.path", f"{path}: not a valid .npz file (not a complete zip archive, e.g. truncated); "
                              "re-create it with np.savez")]
    out: list[tuple[str, str]] = []
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n.removesuffix(".npy"): n for n in zf.namelist() if n.endswith(".npy")}
            missing = [k for k in NPZ_KEYS if k not in members]
            if missing:
                return [("data.path", f"{path}: missing key(s) {missing}; an npz source needs {list(NPZ_KEYS)} "
                                      f"(it has {sorted(members)})")]
            heads = {k: _npy_header(zf, members[k]) for k in NPZ_KEYS}
            for s in SPLITS:
                (xs, xd), (ys, yd) = heads[f"x_{s}"], heads[f"y_{s}"]
                if xd != np.uint8:
                    out.append(("data.path", f"{path}: x_{s} has dtype {xd}; store uint8 pixels 0..255"))
                if not (len(xs) == 3 or (len(xs) == 4 and xs[-1] == 3)):
                    out.append(("data.path", f"{path}: x_{s} has shape {xs}; expected (N,H,W,3) or grayscale (N,H,W)"))
                elif xs[0] == 0:
                    out.append(("data.path", f"{path}: x_{s} is empty; each split needs at least one image"))
                if ys != xs[:1]:
                    out.append(("data.path", f"{path}: y_{s} has shape {ys} but x_{s} has {xs[0] if xs else 0} images"))
                if not np.issubdtype(yd, np.integer):
                    out.append(("data.path", f"{path}: y_{s} has dtype {yd}; labels must be integer class indices"))
            if out:
                return out
            with np.load(path, allow_pickle=False) as z:  # labels only: small next to the pixels
                y = {s: z[f"y_{s}"] for s in SPLITS}
                classes = z["classes"].reshape(-1).tolist() if "classes" in z.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        return [("data.path", f"{path}: not a valid .npz file ({type(e).__name__}: {e}); re-create it with np.savez")]
    n = len(classes) if classes is not None else int(max(y["train"].max(), y["test"].max())) + 1
    for s in SPLITS:
        lo, hi = int(y[s].min()), int(y[s].max())
        if lo < 0 or hi >= n:
            out.append(("data.path", f"{path}: y_{s} has labels in [{lo}, {hi}]; they must lie in 0..{n - 1} "
                                     f"(class indices{'' if classes is None else ' into its classes array'})"))
    if not out and not data_cfg["allow_empty_classes"]:
        empty = np.flatnonzero(np.bincount(y["train"], minlength=n) == 0).tolist()
        if empty:
            out.append(("data.allow_empty_classes",
                        f"false, but class(es) {_ranges(empty)} of 0..{n - 1} in {path} have no training "
                        "image (y_train never holds them): fix the labels, or set data.allow_empty_classes: true"))
    return out


def _ranges(xs: list[int]) -> str:
    """[4, 5, 6, 8] -> '4-6, 8'."""
    runs = np.split(np.asarray(xs), np.flatnonzero(np.diff(xs) != 1) + 1)
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _check_folder(root: Path) -> list[tuple[str, str]]:
    try:
        _folder_trees(root)
    except DataError as e:
        return [("data.path", str(e))]
    return []


# ----------------------------------------------------------------------------- array helpers
def balanced_subset(y: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of size k (all indices if k is None or >= N).

    Round-robin over classes without a loop: rank every sample within its class in a random
    order, then keep the k smallest ranks (ties, i.e. which classes get the remainder, random).
    Classes with fewer than k/C samples contribute all they have.
    """
    n = len(y)
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    order = np.argsort(y[perm], kind="stable")           # grouped by class, random within
    y_sorted = y[perm][order]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.searchsorted(y_sorted, y_sorted, side="left")
    pick = np.lexsort((np.arange(n), rank))[:k]          # by rank, then by random position
    return np.sort(perm[pick])


def stratified_split(y: np.ndarray, fraction: float, seed: int, min_held: int = 0, min_kept: int = 1) -> tuple:
    """(kept, held) sorted indices: round(n_c * fraction) of each class's n_c images held out, at least `min_held`
    while `min_kept` stay (defaults: the data's train/test split; `evaluate.validation_split` holds 1 out)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), bool)
    for c in np.unique(y):  # loop over classes, not images
        idx = rng.permutation(np.flatnonzero(y == c))
        held[idx[:min(max(int(round(len(idx) * fraction)), min_held), len(idx) - min_kept)]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    """(N,H,W) grayscale -> (N,H,W,3) by replication; (N,H,W,3) unchanged."""
    return np.repeat(x[..., None], 3, axis=-1) if x.ndim == 3 else x


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,size,size,3) uint8, batched antialiased bilinear (torch)."""
    if x.shape[1:3] == (size, size):
        return x
    import torch
    import torch.nn.functional as F
    out = np.empty((len(x), size, size, 3), np.uint8)
    for start in range(0, len(x), RESIZE_CHUNK):
        t = torch.from_numpy(np.ascontiguousarray(x[start:start + RESIZE_CHUNK]))
        t = F.interpolate(t.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[start:start + RESIZE_CHUNK] = t.round_().clamp_(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in [0,1] from 256-bin histograms (no float copy of x)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    hists = [np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64) for c in range(3)]
    means = [float(h @ values / h.sum()) for h in hists]
    stds = [float(np.sqrt(h @ (values - m) ** 2 / h.sum())) for h, m in zip(hists, means)]
    return means, stds


def _sha256(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(y, dtype="<i8").tobytes())
    return h.hexdigest()


def _manifest(cfg: dict, classes: list[str], splits: dict) -> dict:
    mean, std = _channel_stats(splits["train"][0])
    return {
        "dataset": dataset_name(cfg), "source": cfg["source"], "path": cfg["path"],
        "classes": classes, "num_classes": len(classes), "image_size": cfg["image_size"],
        "channels": 3, "mean": mean, "std": std, "split_seed": cfg["split_seed"],
        "counts": {s: int(len(y)) for s, (_, y) in splits.items()},
        "class_counts": {s: np.bincount(y, minlength=len(classes)).tolist() for s, (_, y) in splits.items()},
        "sha256": {s: _sha256(x, y) for s, (x, y) in splits.items()},
    }


# ----------------------------------------------------------------------------- loaders
# Each returns (x_train, y_train, x_test, y_test, classes); x is (N,H,W[,3]) uint8.
def _load_digits(cfg: dict):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    tr, te = stratified_split(d.target, cfg["test_fraction"], cfg["split_seed"])
    return x[tr], d.target[tr], x[te], d.target[te], [str(c) for c in d.target_names]


def _load_torchvision(cfg: dict):
    import torchvision.datasets as tvd
    source = cfg["source"]
    cls_name, folder = TORCHVISION[source]
    root = Path(cfg["path"] or f"data/{source}")

    def open_split(train: bool):
        kwargs = {"split": "train" if train else "test"} if source == "stl10" else {"train": train}
        try:
            return getattr(tvd, cls_name)(str(root), download=cfg["download"], **kwargs)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(
                f"data.source={source}: no {cls_name} data in {root} (data.path) and data.download is "
                f"{str(cfg['download']).lower()}. Set data.download: true where internet is available, "
                f"or place the extracted torchvision folder {folder}/ in {root}.") from e

    tr, te = open_split(True), open_split(False)
    if source == "stl10":  # STL10 keeps NCHW arrays and `labels`
        return (tr.data.transpose(0, 2, 3, 1), np.asarray(tr.labels), te.data.transpose(0, 2, 3, 1),
                np.asarray(te.labels), list(tr.classes))
    return tr.data, np.asarray(tr.targets), te.data, np.asarray(te.targets), list(tr.classes)


def _scan_tree(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """ImageFolder scan: sorted class dirs, their image files and integer labels."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subdirectories; expected {root}/<class>/<image> (data.path)")
    files, labels = [], []
    for i, name in enumerate(classes):
        imgs = sorted(p for p in (root / name).iterdir()
                      if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not imgs:
            raise DataError(f"{root / name}: empty class directory (no {sorted(IMG_EXTENSIONS)} files); "
                            "add images or remove the directory")
        files += imgs
        labels += [i] * len(imgs)
    return classes, files, np.asarray(labels, np.int64)


def _decode(files: list[Path], size: int) -> np.ndarray:
    """Decode image files to (N,size,size,3) uint8; one file at a time (I/O-bound)."""
    from PIL import Image
    x = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:  # PIL's bilinear resize antialiases when shrinking
                x[i] = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot read image ({e}); fix or delete the file") from e
    return x


def _folder_trees(root: Path) -> list[tuple[list[str], list[Path], np.ndarray]]:
    """The scans of train/ and test/, or of the one <class>/ tree; structure errors raise."""
    has = [(root / s).is_dir() for s in SPLITS]
    if any(has) and not all(has):
        raise DataError(f"{root}: has only one of train/ and test/; provide both, or one <class>/ tree")
    if not all(has):
        return [_scan_tree(root)]
    trees = [_scan_tree(root / s) for s in SPLITS]
    if trees[0][0] != trees[1][0]:
        raise DataError(f"{root}: train/ classes {trees[0][0]} differ from test/ classes {trees[1][0]}")
    return trees


def _load_folder(cfg: dict):
    root, size = _input_path(cfg, want_dir=True), cfg["image_size"]
    trees = _folder_trees(root)
    if len(trees) == 2:
        (cls_tr, f_tr, y_tr), (_, f_te, y_te) = trees
        return _decode(f_tr, size), y_tr, _decode(f_te, size), y_te, cls_tr
    classes, files, y = trees[0]
    x = _decode(files, size)
    tr, te = stratified_split(y, cfg["test_fraction"], cfg["split_seed"])
    return x[tr], y[tr], x[te], y[te], classes


def _input_path(cfg: dict, want_dir: bool) -> Path:
    """data.path for folder/npz sources, checked before any heavy work."""
    kind = "an ImageFolder directory" if want_dir else "an .npz file"
    if not cfg["path"]:
        raise DataError(f"data.path: required for data.source={cfg['source']}; set it to {kind}")
    path = Path(cfg["path"])
    if not path.exists():
        rel = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise DataError(f"data.path: {path} does not exist{rel}; fix data.path")
    if not (path.is_dir() if want_dir else path.is_file()):
        raise DataError(f"data.path: {path} is not {kind}; fix data.path")
    return path


def _read_npz(path: Path) -> dict:
    """All arrays of an .npz file; unreadable or truncated files become a DataError."""
    if not zipfile.is_zipfile(path):  # np.savez writes a zip; truncation loses its directory
        raise DataError(f"{path}: not a valid .npz file (not a complete zip archive, e.g. truncated); "
                        "re-create it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a valid .npz file ({type(e).__name__}: {e}); "
                        "re-create it with np.savez") from e


def _load_npz(cfg: dict):
    """The npz's arrays; prepare ran check_source first (keys, shapes, dtypes, label range)."""
    a = _read_npz(_input_path(cfg, want_dir=False))
    classes = [str(c) for c in a["classes"].reshape(-1).tolist()] if "classes" in a else None
    if classes is None:
        classes = [str(c) for c in range(int(max(a["y_train"].max(), a["y_test"].max())) + 1)]
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"], classes


LOADERS = {"digits": _load_digits, "cifar10": _load_torchvision, "cifar100": _load_torchvision,
           "stl10": _load_torchvision, "folder": _load_folder, "npz": _load_npz}
