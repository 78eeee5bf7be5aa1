"""Outputs are readable as the umask says (the atomic writer's temporary file would be 0600)."""
from __future__ import annotations

import os
import stat

import pytest

from sslpipe.io import write_json, write_npz


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "m.json", {"a": 1})
        write_npz(tmp_path / "p.npz", {"x": [1, 2]})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives: the reference
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("m.json", "p.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
