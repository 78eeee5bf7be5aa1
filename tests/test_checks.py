"""The cross-key config checks (`config.check`) where users meet them: `resolve`, the
`check-config` command, and the Snakefile, which must refuse a schema-valid but impossible
config before any job starts (a dry run is enough: no job runs, nothing is written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sslpipe import cli
from sslpipe.config import ConfigError, resolve

REPO = Path(__file__).resolve().parents[1]
INVERTED_RATIO = {"methods": ["simclr"], "simclr": {"views": {"crop_ratio": [1.5, 0.75]}}}


@pytest.mark.parametrize("method", ["simclr", "moco", "dae"])
def test_inverted_crop_ratio_is_rejected_and_named(method):
    with pytest.raises(ConfigError, match=rf"'{method}\.views\.crop_ratio'.*1\.5, 0\.75.*the minimum exceeds"):
        resolve({"methods": [method], method: {"views": {"crop_ratio": [1.5, 0.75]}}})
    assert resolve({"methods": [method], method: {"views": {"crop_ratio": [0.75, 0.75]}}})  # equal is fine


def test_check_config_command_prints_defaults_and_names_a_bad_key(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"methods": ["moco"], "moco": {"queue_size": 256}}))
    assert cli.main(["check-config", str(good)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["moco"]["queue_size"] == 256 and printed["moco"]["temperature"] == 0.2  # a default filled in
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(INVERTED_RATIO))
    assert cli.main(["check-config", str(bad)]) == 2
    assert "simclr.views.crop_ratio" in capsys.readouterr().err


@pytest.mark.slow
def test_snakefile_refuses_an_impossible_config_before_any_job(tmp_path):
    """Schema-valid, rejected only by config.check: the Snakefile must call it."""
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**INVERTED_RATIO, "tracking": {"enabled": False}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
           "--cores", "1", "--configfile", str(tmp_path / "bad.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "simclr.views.crop_ratio" in out and "the minimum exceeds the maximum" in out, out[-3000:]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(tmp_path):
    """The conftest's switch, on a checkout without ../shared: SSLPIPE_REQUIRE_SHARED=1 (.ci/run)
    turns the cifar_small fixture's skip into a failure."""
    tests = tmp_path / "checkout" / "tests"
    tests.mkdir(parents=True)
    (tests / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tests / "test_uses_shared.py").write_text("def test_it(cifar_small):\n    assert cifar_small.exists()\n")
    assert (REPO / ".ci" / "run").read_text().count("SSLPIPE_REQUIRE_SHARED=1 ") == 1

    def pytest_rc(**env) -> tuple[int, str]:
        e = {k: v for k, v in os.environ.items() if k != "SSLPIPE_REQUIRE_SHARED"} | env
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tests)],
                              capture_output=True, text=True, env=e, cwd=tests.parent, timeout=120)
        return proc.returncode, proc.stdout

    rc, out = pytest_rc()
    assert rc == 0 and "1 skipped" in out, out
    rc, out = pytest_rc(SSLPIPE_REQUIRE_SHARED="1")
    assert rc == 1 and "1 error" in out and "may not skip here" in out, out
