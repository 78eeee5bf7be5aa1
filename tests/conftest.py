"""Shared fixtures. Tests use real data: scikit-learn's digits, and the CIFAR-10 subset in
../shared when present. With SSLPIPE_REQUIRE_SHARED=1 (set by .ci/run) its absence fails the
tests that need it instead of skipping them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10_small.npz"


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    """One intra-op thread for every test: the tensors are tiny, and on a busy 2-core machine two
    spinning threads cost more than they save (test_moco's one-epoch run took 11 s of CPU instead
    of 0.5). A test that wants more threads sets them itself and restores them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cifar_small() -> Path:
    if not SHARED_CIFAR.exists():
        why = f"the CIFAR-10 subset {SHARED_CIFAR} is absent (it ships only beside the developers' checkout)"
        if os.environ.get("SSLPIPE_REQUIRE_SHARED") == "1":
            pytest.fail(f"{why}, and SSLPIPE_REQUIRE_SHARED=1 says these tests may not skip here")
        pytest.skip(why)
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A prepared digits dataset at 16 px (real images), shared by tests that only read it."""
    from sslpipe import data
    from sslpipe.config import resolve

    out = tmp_path_factory.mktemp("digits")
    data.prepare(resolve({})["data"] | {"image_size": 16}, out)
    return out
