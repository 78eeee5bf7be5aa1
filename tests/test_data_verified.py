"""Prepared arrays are verified against their manifest: a swapped or truncated file stops the stage
that reads it with one line naming the file and the command that rebuilds it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from sslpipe import data
from sslpipe.config import ConfigError, resolve


@pytest.fixture
def prepared(digits_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(digits_dir, out)
    return out


def test_valid_data_loads(prepared):
    x, y = data.load_split(prepared, "train")
    assert x.dtype == np.uint8 and len(x) == len(y)


def test_swapped_train_file_is_refused(prepared):
    x, y = data.load_split(prepared, "train")
    np.savez(prepared / "train.npz", x=x[::-1].copy(), y=y[::-1].copy())  # valid npz, other order
    with pytest.raises(data.DataError) as e:
        data.load_split(prepared, "train")
    msg = str(e.value)
    assert "train.npz" in msg and "do not match" in msg and "snakemake --forcerun prepare" in msg
    assert "\n" not in msg


def test_truncated_file_is_named(prepared):
    raw = (prepared / "test.npz").read_bytes()
    (prepared / "test.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match=r"test\.npz: unreadable .*snakemake --forcerun prepare"):
        data.load_split(prepared, "test")


@pytest.mark.parametrize("bad", [".", "..", "../x", "/abs", "a/b", ".hidden"])
def test_names_that_would_escape_the_project_are_rejected(bad):
    for cfg in ({"name": bad}, {"data": {"name": bad}}):
        with pytest.raises(ConfigError):
            resolve(cfg)


def test_config_hash_covers_what_changes_results_only():
    from sslpipe.config import config_hash

    base = resolve({})
    same = [resolve({"tracking": {"on_error": "continue"}}), resolve({"pretrain": {"checkpoint_every": 5}}),
            resolve({"tracking": {"enabled": False, "uri": "http://127.0.0.1:5000"}})]
    assert {config_hash(c) for c in same} == {config_hash(base)}
    assert config_hash(resolve({"pretrain": {"lr": 0.01}})) != config_hash(base)
