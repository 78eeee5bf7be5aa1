"""Shared helpers of the benchmark scripts: machine description, timing, JSON-line output and
rows appended to benchmarks/RESULTS.md (one table per benchmark).

Benchmarks are scripts, never tests: they print figures and record them; they assert nothing.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
CIFAR_SMALL = REPO.parent / "shared" / "data" / "cifar10_small.npz"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load": load()}


def machine_cell(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"


def now() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def emit(record: dict) -> None:
    """One JSON line on stdout."""
    print(json.dumps(record, default=str), flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timeit(fn, repeat: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeat` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def append_row(section: str, intro: str, header: list[str], row: list) -> None:
    """Append `row` to the table under '## section' in RESULTS.md (creating both if absent)."""
    line = "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |"
    text = RESULTS.read_text() if RESULTS.exists() else "# sslpipe benchmark results\n"
    title = f"## {section}"
    if title not in text.splitlines():
        head = "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|\n"
        text = text.rstrip("\n") + f"\n\n{title}\n\n{intro}\n\n{head}{line}\n"
    else:
        lines = text.splitlines()
        start = lines.index(title)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rows = [i for i in range(start, end) if lines[i].startswith("|")]
        if rows:
            # A script that gained columns: new header; older rows get "-" in the new cells.
            lines[rows[0]] = "| " + " | ".join(header) + " |"
            lines[rows[0] + 1] = "|" + "|".join("---" for _ in header) + "|"
            for i in rows[2:]:
                missing = len(header) - (lines[i].count("|") - 1)
                if missing > 0:
                    lines[i] += " - |" * missing
            lines.insert(rows[-1] + 1, line)
        else:
            lines[start + 1:start + 1] = ["", intro, "", "| " + " | ".join(header) + " |",
                                          "|" + "|".join("---" for _ in header) + "|", line]
        text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"
