"""Atomic file output: a killed job never leaves a file Snakemake would take as done.

Also the small picture helpers every stage uses (a tile grid and a PNG writer), kept free of
torchvision: importing it costs ~1.5 s of CPU in each job that draws one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then put back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same directory so the final `os.replace` is atomic
    on POSIX file systems. Its name keeps the suffix, because writers such as
    `np.savez` and matplotlib choose a format (or append an extension) from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    # mkstemp creates 0600 whatever the umask; outputs get what open() would give (0666 & ~umask),
    # so group members on a shared cluster can read results, encoders and reports.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npz(path: str | os.PathLike, arrays: dict) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """A matplotlib Figure (not pyplot: no global state, no GUI backend) as a PNG, written
    atomically, cropped to its contents."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `path`, created if missing, for the block:
    one process at a time, across processes on this machine."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)


def make_grid(tiles, nrow: int, padding: int = 2, pad_value: float = 1.0):
    """tiles: K x C x h x w tensor -> C x H' x W', `nrow` tiles per row, each framed by
    `padding` pixels of `pad_value` (torchvision.utils.make_grid's layout; a single tile is
    framed too, where torchvision returns it bare)."""
    k, c, h, w = tiles.shape
    nrow = min(nrow, k)  # fewer tiles than a row: a narrower grid, as torchvision's
    rows = -(-k // nrow)
    grid = tiles.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(k):  # one copy per tile of a small picture: not a hot path
        r, col = divmod(i, nrow)
        top, left = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = tiles[i]
    return grid


def save_png(img, path: str | os.PathLike, min_height: int = 0) -> None:
    """img: 3 x H x W float tensor in [0, 1] -> PNG, written atomically.

    Small images are enlarged by an integer factor (nearest neighbour, so pixels stay exact)
    until the picture is at least `min_height` tall: 16 px digits are unreadable otherwise.
    """
    from PIL import Image

    arr = (img.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(arr)
    factor = max(1, -(-min_height // picture.height))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
