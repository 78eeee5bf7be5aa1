#!/usr/bin/env python3
"""Mutation check: does each deliberate breakage of the training, evaluation and config code
make at least one test fail? (issue 17)

Each mutation is (file, the exact old snippet, its replacement, the tests to run). The script
copies the checkout (tracked and untracked, non-ignored files, as they are now) into a scratch
directory once, never touching the live tree; for each mutation it writes the broken file
there, runs the named tests against that copy (PYTHONPATH points at the copy's src/, and the
script checks that `sslpipe` really is imported from there), restores the file, and prints a
table: mutation, caught or not. A snippet that no longer occurs exactly once is reported as
"stale" (the code moved on: update the mutation), never guessed at.

    .venv/bin/python scripts/mutation_check.py            # all mutations
    .venv/bin/python scripts/mutation_check.py --list     # names only
    .venv/bin/python scripts/mutation_check.py --only lr_constant --only no_broadcast
    .venv/bin/python scripts/mutation_check.py --baseline # first check the tests pass unmutated

Exit status 0 when every mutation is caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


M = Mutation
MUTATIONS = [
    # ---- the breakages of issue 17's table ----
    M("simclr_z1_twice", "src/sslpipe/methods/simclr.py",
      "nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset)",
      "nt_xent(z1, z1, self.temperature, z1_all, z1_all, offset)",
      ("tests/test_simclr.py",), "SimCLR.loss: nt_xent(z1, z1, ...) (no second view)"),
    M("moco_no_q_normalise", "src/sslpipe/methods/moco.py",
      "q = F.normalize(grouped_forward(self._query, v_q, groups, shuffle=False).float(), dim=1)",
      "q = grouped_forward(self._query, v_q, groups, shuffle=False).float()",
      ("tests/test_moco.py",), "MoCo.loss without the q normalisation"),
    M("dae_hybrid_one_view", "src/sslpipe/methods/dae.py",
      "l_nce = nt_xent(z1, z2, self.temperature, *global_views(z1, z2))",
      "l_nce = nt_xent(z1, z1, self.temperature, *global_views(z1, z1))",
      ("tests/test_dae.py",), "DAE.loss (hybrid): NT-Xent of one view with itself"),
    M("cd_energies_swapped", "src/sslpipe/methods/cd.py",
      'l_cd = cd_loss(e_pos, e_neg, c["alpha"])', 'l_cd = cd_loss(e_neg, e_pos, c["alpha"])',  # as of 14fbf6f
      ("tests/test_cd.py",), "CD.loss with e_pos and e_neg swapped (trains backwards)"),
    M("lr_constant", "src/sslpipe/pretrain.py",
      'return lr_at(step, self.total, self.warmup, self.tcfg["lr"])', 'return self.tcfg["lr"]',
      ("tests/test_loop.py",), "a constant learning rate instead of lr_at (warm-up + cosine)"),
    M("no_permutation_broadcast", "src/sslpipe/pretrain.py",
      "st.order = ddp.broadcast(torch.randperm(len(self.x), device=self.device))",
      "st.order = torch.randperm(len(self.x), device=self.device)",
      ("tests/test_ddp.py::test_ranks_train_on_disjoint_halves_of_the_single_process_batch",),
      "no broadcast of the epoch permutation under DDP"),
    M("probe_not_refit", "src/sslpipe/evaluate.py",
      "logits = _fit_and_predict(ftr, ytr, fte, num_classes, best, steps, seed)",
      "tr, _ = validation_split(ytr, val_fraction, seed)\n"
      "    logits = _fit_and_predict(ftr[tr], ytr[tr], fte, num_classes, best, steps, seed)",
      ("tests/test_evaluate.py",), "the probe not refit on all training data after choosing weight decay"),
    M("test_standardised_on_itself", "src/sslpipe/evaluate.py",
      "return (ftr - mean) / std, (fte - mean) / std",
      "return (ftr - mean) / std, (fte - fte.mean(0)) / fte.std(0).clamp_min(1e-6)",
      ("tests/test_evaluate.py",), "test features standardised with their own statistics"),
    M("crop_ratio_check_removed", "src/sslpipe/config.py",
      'for part in ("crop_scale", "crop_ratio"):', 'for part in ("crop_scale",):',
      ("tests/test_checks.py", "tests/test_config.py"), "the crop_ratio min > max check removed"),
    # The Snakefile no longer calls check(config) itself: since 7ad0f56 it resolves the stack with
    # config.resolve_stack, whose cross-key checks are config.problems. Removing the Snakefile's
    # check = the Snakefile resolving without them (defaults still filled, config.py intact, so
    # `sslpipe check-config` still refuses the config: only the Snakefile's own test can see it).
    M("snakefile_check_removed", "workflow/rules/common.smk",
      "try:\n    _resolved = sslconfig.resolve_stack(",
      "sslconfig.problems = lambda *a, **k: []  # mutant: the Snakefile skips the cross-key checks\n"
      "try:\n    _resolved = sslconfig.resolve_stack(",
      ("tests/test_checks.py::test_snakefile_refuses_an_impossible_config_before_any_job",),
      "the Snakefile's check(config) call removed (it resolves the config without config.problems)"),
    # The same checks skipped in config.py itself, i.e. for check-config and every stage too.
    M("config_checks_skipped", "src/sslpipe/config.py",
      "lines = problems(resolved, origins or {}, data=data, device=device)", "lines = []",
      ("tests/test_checks.py::test_snakefile_refuses_an_impossible_config_before_any_job",),
      "the cross-key checks (config.problems) skipped when the Snakefile resolves the config"),
    M("sqlite_one_attempt", "src/sslpipe/tracking.py",
      "attempts: int = 8", "attempts: int = 1",
      ("tests/test_tracking.py::test_a_write_that_meets_a_held_sqlite_lock_is_retried_until_it_is_released",),
      "the SQLite retry reduced to one attempt"),
    # ---- more ----
    M("no_per_rank_streams", "src/sslpipe/pretrain.py",
      "if ddp.rank() > 0:  # independent augmentation streams", "if False:  # independent augmentation streams",
      ("tests/test_ddp.py::test_ranks_draw_independent_augmentation_streams",),
      "DDP ranks share one augmentation stream (no per-rank reseed)"),
    M("grads_summed_not_averaged", "src/sslpipe/distributed.py",
      "flat /= world()", "flat /= 1",
      ("tests/test_ddp.py::test_one_step_on_two_processes_equals_one_process",),
      "DDP gradients summed over ranks instead of averaged"),
    M("rng_not_restored", "src/sslpipe/checkpoint.py",
      'set_rng_state(state["rng_ranks"][ddp.rank()] if "rng_ranks" in state else state["rng"], self.device)',
      "pass",
      ("tests/test_resume.py::test_resume_after_signals_equals_an_uninterrupted_run",),
      "resume does not restore the RNG states"),
    M("fingerprint_ignores_world", "src/sslpipe/checkpoint.py",
      '"code": code_hash(), "world": world}', '"code": code_hash()}',
      ("tests/test_loop.py",), "a checkpoint stays valid across a change of world size"),
    M("code_hash_ignores_methods", "src/sslpipe/checkpoint.py",
      'TRAINING_CODE = ("pretrain.py", "checkpoint.py", "models.py", "augment.py", "methods", "supervised.py")',
      'TRAINING_CODE = ("pretrain.py", "checkpoint.py", "models.py", "augment.py", "supervised.py")',
      ("tests/test_loop.py",), "a checkpoint stays valid across a change of a method's code"),
    M("checkpoint_every_ignored", "src/sslpipe/checkpoint.py",
      "return self.path is not None and epochs_done % self.every == 0", "return self.path is not None",
      ("tests/test_loop.py",), "checkpoint_every ignored (a checkpoint every epoch)"),
    M("knn_ignores_temperature", "src/sslpipe/evaluate.py",
      "ytr[idx], (top / temperature).exp())", "ytr[idx], top.exp())",
      ("tests/test_evaluate.py",), "kNN votes without the temperature"),
]


def copy_checkout(dest: Path) -> None:
    """The working tree as it is now (tracked + untracked, not ignored), without .git/.venv."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():  # tracked but deleted in the working tree: skip
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def env_for(copy: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = f"{copy / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file never meets a stale .pyc of its mutant
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - t0, "timeout"
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" - ")[0].split("::", 1)[-1] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    last = lines[-1] if lines else proc.stderr[-200:]
    return proc.returncode, time.monotonic() - t0, f"{failed[0]}: {last}" if failed else last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--baseline", action="store_true", help="first run every named test unmutated")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:28s} {m.file}: {m.what}  [{' '.join(m.tests)}]")
        return 0
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        sys.exit(f"unknown mutation(s): {sorted(unknown)}; see --list")

    scratch = Path(tempfile.mkdtemp(prefix="sslpipe-mutants-"))
    copy = scratch / "checkout"
    try:
        copy_checkout(copy)
        where = subprocess.run([sys.executable, "-c", "import sslpipe; print(sslpipe.__file__)"], cwd=copy,
                               env=env_for(copy), capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(copy)):
            sys.exit(f"sslpipe imports from {where!r}, not from the scratch copy {copy}: refusing to run")
        print(f"scratch copy of {REPO} at {copy} (sslpipe from {where})", flush=True)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            rc, secs, last = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline (unmutated): rc {rc} in {secs:.0f} s: {last}", flush=True)
            if rc != 0:
                print("the named tests do not pass unmutated: a 'caught' below would mean nothing")
                return 1
        rows = []
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            count = original.count(m.old)
            if count != 1:
                rows.append((m, f"STALE (snippet found {count}x)", 0.0, ""))
                print(f"{m.name}: stale", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, secs, last = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {0: "NOT CAUGHT", 1: "caught"}.get(rc, f"error (rc {rc})")
            rows.append((m, verdict, secs, last))
            print(f"{m.name}: {verdict} ({secs:.0f} s) {last}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(f"| {'mutation':28s} | {'file':26s} | {'result':24s} | {'s':>4s} | tests run -> first failure |")
    print(f"|{'-' * 30}|{'-' * 28}|{'-' * 26}|{'-' * 6}|----------------------------|")
    for m, verdict, secs, last in rows:
        first = last.split(": ")[0] if verdict == "caught" else ""
        print(f"| {m.name:28s} | {m.file.replace('src/sslpipe/', ''):26s} | {verdict:24s} | {secs:4.0f} | "
              f"{' '.join(t.replace('tests/', '').split('::')[0] for t in m.tests)}"
              + (f" -> {first}" if first else "") + " |")
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\n{caught}/{len(rows)} mutations caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
