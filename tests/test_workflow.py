"""The workflow as a user drives it, in dry runs (seconds each, no training): configs mean the
same to Snakemake and to `sslpipe check-config`, README's commands run, and bad inputs stop
with one line naming the key and file before any job starts (nothing written to results/)."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CIFAR_CPU_DATA = REPO.parent / "shared" / "data" / "cifar10_small.npz"
# Each test runs Snakemake (a few seconds each, ~2 min in all on 2 busy cores).
pytestmark = pytest.mark.slow
SHIPPED = ["config/config.yaml", "config/cifar10.yaml", "config/cifar10-cpu.yaml"]


def run(args: list[str], cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SSLPIPE_TRACKING", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def snakemake(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(cwd), *args],
               cwd=cwd, check=check)


def check_config(*args: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sslpipe", "check-config", *args], cwd=cwd, check=check)


def job_configs(out: str) -> list[dict]:
    """The --config JSON of every job command a `snakemake -n -p` printed."""
    found = []
    for line in out.splitlines():
        if "-m sslpipe" in line and "--config" in line:
            words = shlex.split(line.split("sslpipe", 1)[1].split(" > ")[0])  # the log redirect: the report's --inputs may be "<TBD>" in a dry run
            found.append(json.loads(words[words.index("--config") + 1]))
    return found


def leaves(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def at(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


@pytest.mark.parametrize("configfile", SHIPPED)
def test_dry_run_jobs_receive_what_check_config_prints(configfile):
    """Every value in every job's command equals check-config's for the same file alone, so a
    --configfile inherits nothing from config/config.yaml (the CIFAR runs flip, digits do not)."""
    if "cpu" in configfile and not CIFAR_CPU_DATA.exists():
        pytest.skip(f"{CIFAR_CPU_DATA} is absent")
    resolved = json.loads(check_config(configfile).stdout)
    out = snakemake("-n", "-p", "-F", "--cores", "2", "--configfile", configfile).stdout
    jobs = job_configs(out)
    assert len(jobs) >= 10
    for cfg in jobs:
        for path, value in leaves(cfg):
            if path == ("precision",) and value == "fp32" and "pretrain" not in cfg:
                continue  # evaluation jobs run in fp32 whatever `precision` says (documented)
            assert value == at(resolved, path), (configfile, path, value)
    raw = yaml.safe_load((REPO / configfile).read_text())
    flips = {c["simclr"]["views"]["flip_p"] for c in jobs if "simclr" in c and "augment" in c}
    assert flips == {at(resolved, ("simclr", "views", "flip_p"))}
    if configfile != "config/config.yaml":
        assert "flip_p" not in json.dumps(raw.get("simclr", {})) and flips == {0.5}  # not the digits 0.0
        assert resolved["cd"]["langevin_steps"] != 5 or raw.get("cd", {}).get("langevin_steps") == 5
    assert resolved["name"] == raw["name"] and f"results/{raw['name']}/report/report.html" in out


def test_plain_snakemake_uses_the_default_profile_and_config():
    # -F: every job listed even where a `make run` in this checkout left the results up to date.
    out = snakemake("-n", "-F", check=True)
    text = out.stdout + out.stderr
    assert "profiles/default" in text and "results/digits-default/report/report.html" in text


def test_lint_is_clean():
    proc = snakemake("--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if re.match(r"(snakemake|python -m sslpipe check-config|sslpipe check-config)\b", ln)
            and "--profile" not in ln and "--report" not in ln]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_run(command):
    words = shlex.split(command)
    if words[0] == "snakemake":
        snakemake("-n", *words[1:])
    else:
        check_config(*words[words.index("check-config") + 1:])


def test_config_overrides_are_coerced_like_the_schema_says():
    out = snakemake("-n", "-p", "--cores", "2", "--config", "seeds=[0,1,2]", "pretrain={epochs: 3, compile: false}").stdout
    jobs = job_configs(out)
    assert {c["pretrain"]["epochs"] for c in jobs if "pretrain" in c and "channels_last" in c} == {3}
    assert "seed2" in out
    printed = json.loads(check_config("--config", "seeds=[0,1,2]", "pretrain={epochs: 3}").stdout)
    assert printed["seeds"] == [0, 1, 2] and printed["pretrain"]["epochs"] == 3


# ----------------------------------------------------------------------------- errors
def npz(path: Path, x_dtype=np.uint8, y_train=None) -> str:
    y = np.arange(40) % 10 if y_train is None else y_train
    np.savez(path, x_train=np.zeros((40, 8, 8, 3), x_dtype), y_train=y,
             x_test=np.zeros((10, 8, 8, 3), np.uint8), y_test=np.arange(10))
    return str(path)


def holes() -> np.ndarray:
    y = np.arange(40) % 10
    y[(y >= 4) & (y <= 8)] = 0
    return y


def bad_cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    (tmp / "imgs/cat").mkdir(parents=True)
    (tmp / "imgs/dog").mkdir()
    (tmp / "imgs/cat/a.png").write_bytes(b"")
    return {
        "misspelt key": ({"pretrain": {"epoch": 3}},
                         "config key 'pretrain.epoch' (from bad.yaml): unknown key; did you mean 'pretrain.epochs'?"),
        "bad value": ({"data": {"source": "cifar"}},
                      "config key 'data.source' = \"cifar\" (from bad.yaml): not allowed; allowed: one of"),
        "wrong type": ({"seeds": ["zero"]}, "config key 'seeds.0' = \"zero\" (from bad.yaml): wrong type"),
        "missing data.path": ({"data": {"source": "npz", "path": "nope.npz"}},
                              "config key 'data.path' (from bad.yaml): nope.npz does not exist"),
        "bad npz dtype": ({"data": {"source": "npz", "path": npz(tmp / "f.npz", np.float32)}},
                          "x_train has dtype float32; store uint8"),
        "empty classes": ({"data": {"source": "npz", "path": npz(tmp / "h.npz", y_train=holes())}},
                          "config key 'data.allow_empty_classes' (from bad.yaml): false, but class(es) 4-8"),
        "folder class without images": ({"data": {"source": "folder", "path": str(tmp / "imgs")}},
                                        "dog: empty class directory"),
        "cuda without a GPU": ({"device": "cuda"}, "config key 'device' (from bad.yaml): 'cuda' but no CUDA GPU"),
    }


@pytest.mark.parametrize("case", ["misspelt key", "bad value", "wrong type", "missing data.path", "bad npz dtype",
                                  "empty classes", "folder class without images", "cuda without a GPU"])
def test_bad_input_is_one_line_before_any_job(case, tmp_path):
    if case == "cuda without a GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    cfg, message = bad_cases(tmp_path)[case]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"name": "bad", **cfg}))
    proc = snakemake("--cores", "1", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("config key")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert len(lines[0]) < 400
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    # check-config says the same, line for line.
    proc = check_config("bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_empty_classes_are_allowed_with_the_flag(tmp_path):
    path = npz(tmp_path / "h.npz", y_train=holes())
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"data": {"source": "npz", "path": path,
                                                               "allow_empty_classes": True}}))
    assert json.loads(check_config("ok.yaml", cwd=tmp_path).stdout)["data"]["allow_empty_classes"] is True


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\npretrain:\n  epochs: 3\n   lr: 2\n")
    proc = check_config("bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "config file bad.yaml:4:" in proc.stderr and "YAML syntax error" in proc.stderr
    # Snakemake reads --configfile files itself, before the Snakefile: its own message, no job.
    proc = snakemake("--cores", "1", "--configfile", "bad.yaml", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- re-run granularity
def test_keys_left_out_of_the_augment_job_do_not_change_any_policy():
    """The augment job's params leave out NOT_POLICY (common.smk): none of those keys may
    change the view policy it writes, or a change would leave a stale policy.json."""
    from sslpipe.config import resolve
    from sslpipe.methods import METHODS

    text = (REPO / "workflow/rules/common.smk").read_text()
    not_policy = ast.literal_eval(re.search(r"NOT_POLICY = (\{.*?\})", text, re.S).group(1))
    cfg = resolve({})
    checked = 0
    for name, cls in METHODS.items():
        base = cls.policy(cfg[name], 32)
        for key in not_policy & set(cfg[name]):
            v = cfg[name][key]
            changed = {**cfg[name], key: ({"epochs": 99} if isinstance(v, dict) else
                                          (not v) if isinstance(v, bool) else
                                          v * 2 + 1 if isinstance(v, (int, float)) else "x")}
            assert cls.policy(changed, 32) == base, (name, key)
            checked += 1
        if name == "pirl":  # and a key it does read is not left out
            assert cls.policy({**cfg[name], "grid": 2}, 32) != base
    assert checked >= 10
