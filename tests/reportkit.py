"""Test helpers for the report: its inputs as the report rule gives them, and the files a
block of code opens (to check that the report reads nothing it was not given)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

try:
    from sslpipe.report import build_report as sslpipe_build_report
except ModuleNotFoundError:  # package not installed into the venv: import from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sslpipe.report import build_report as sslpipe_build_report


def inputs_of(root: Path, methods: list[str], seeds: list[int], baselines: list[str], benchmarks: bool = True) -> dict:
    """The synthetic tree's files keyed as build_report takes them, as the report rule gives them
    (workflow/rules/common.smk report_files): every file of this config's jobs whether or not it
    exists, a pretrain folder's other PNGs as its diagnostics, and the benchmark TSVs of its jobs."""
    bench = root.parents[1] / "benchmarks" / root.name
    jobs = ([("prepare", None, None, bench / "prepare.tsv")] + [("augment", m, None, bench / f"augment/{m}.tsv") for m in methods]
            + [("pretrain", m, s, bench / f"pretrain/{m}/seed{s}.tsv") for m in methods for s in seeds]
            + [("linear_eval", n, s, bench / f"linear_eval/{n}/seed{s}.tsv") for n in methods + baselines for s in seeds])
    pre = {m: {s: root / "pretrain" / m / f"seed{s}" for s in seeds} for m in methods}
    return {"manifest": str(root / "data" / "manifest.json"),
            "augment": {m: {k: str(root / "augment" / m / f) for k, f in
                            (("policy", "policy.json"), ("preview", "preview.png"), ("benchmark", "benchmark.json"))}
                        for m in methods},
            "pretrain": {m: {s: {"summary": str(d / "summary.json"), "history": str(d / "history.csv"),
                                 "diagnostics": sorted(str(p) for p in d.glob("*.png"))} for s, d in pre[m].items()}
                         for m in methods},
            "evaluations": {n: {s: {k: str(root / "linear_eval" / n / f"seed{s}" / f) for k, f in
                                    (("metrics", "metrics.json"), ("predictions", "predictions.npz"),
                                     ("embedding", "embedding.png"))} for s in seeds} for n in methods + baselines},
            # The rule declares every job's TSV (Snakemake writes them all); this tree holds some.
            "benchmarks": [[st, n, s, str(p)] for st, n, s, p in jobs if p.is_file()] if benchmarks else []}


def build_report(root: Path, dataset: str, methods: list[str], seeds: list[int], baselines: list[str], out: Path,
                 provenance: dict | None = None, benchmarks: bool = True) -> dict:
    """sslpipe.report.build_report on the synthetic tree at `root`, given its files as the rule gives them."""
    return sslpipe_build_report(inputs_of(root, methods, seeds, baselines, benchmarks), dataset, methods, seeds,
                                baselines, out, provenance)


@contextlib.contextmanager
def opened_files():
    """Yield a list that collects every path opened (for reading or writing) in this process
    while the block runs: Python's `open` audit event (builtins.open, io, os.open; numpy, pandas
    and PIL all open through them)."""
    global _OPENED
    if not _HOOKED:
        _hook()
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


_OPENED: list | None = None
_HOOKED: list = []


def _hook() -> None:
    def audit(event: str, args: tuple) -> None:
        if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            _OPENED.append(os.fsdecode(args[0]))
    sys.addaudithook(audit)  # cannot be removed: it records only inside opened_files()
    _HOOKED.append(True)


def only_given(opened: list[str], inputs: dict, tree: Path, out: Path) -> tuple[set, set]:
    """(files under `tree` that were opened, outside `out`; every path in `inputs`), resolved."""
    def paths(node):
        if isinstance(node, dict):
            for v in node.values():
                yield from paths(v)
        elif isinstance(node, list):
            for v in node:
                yield from paths(v)
        elif isinstance(node, str) and ("/" in node or os.sep in node):  # not stage or method names
            yield Path(node).resolve()
    tree, out = tree.resolve(), out.resolve()
    read = {p for p in map(lambda f: Path(f).resolve(), opened) if p.is_relative_to(tree) and not p.is_relative_to(out)}
    return read, set(paths(inputs))
