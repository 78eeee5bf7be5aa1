"""What a run needs beside its config to be reproduced: code version, packages, machine."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("sslpipe", "torch", "torchvision", "kornia", "numpy", "scikit-learn", "mlflow", "snakemake")


@functools.cache
def git_commit() -> str:
    """The commit of the checkout the package runs from, with '-dirty' for local changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def describe() -> dict[str, str]:
    return {"git_commit": git_commit(), "platform": platform.platform(), **package_versions()}
