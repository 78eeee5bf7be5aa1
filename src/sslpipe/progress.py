"""What a job tells the person watching it: plain lines in a log file, a bar on a terminal.

Every stage prints at least one summary line (counts, accuracies, files written) to stdout,
which each Snakemake rule redirects into its log (`logs/{name}/...`), so `tail -f` on a log
follows the job. Epoch lines are plain text in a file; when stdout is a terminal (a stage run
by hand) they are redrawn in place behind a progress bar, tqdm-style.
"""
from __future__ import annotations

import re
import sys
from typing import TextIO

EPOCH = re.compile(r"^(?:\S+ )?epoch (\d+)/(\d+) ")  # 'epoch 3/8 ...' or 'supervised epoch 3/8 ...'
_open_bar: list[TextIO] = []  # the stream whose last line is a bar still being redrawn


def clock(seconds: float) -> str:
    """42 -> '0:42', 3725 -> '1:02:05'."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // max(total, 1):3d}%"


def say(line: str, stream: TextIO | None = None) -> None:
    """Print one line now (flushed: the log shows it as it happens, and keeps it after a SIGKILL).
    On a terminal an epoch line ('epoch 3/8 ...') is redrawn in place behind a bar instead."""
    stream = stream or sys.stdout
    m = EPOCH.match(line)
    tty = getattr(stream, "isatty", lambda: False)()
    if tty and m:
        done, total = int(m.group(1)), int(m.group(2))
        stream.write(f"\r{bar(done, total)} {line}\x1b[K" + ("\n" if done >= total else ""))
        _open_bar[:] = [] if done >= total else [stream]
    else:
        if _open_bar and _open_bar[0] is stream:  # finish the bar's line before a plain one
            stream.write("\n")
            _open_bar.clear()
        stream.write(line + "\n")
    stream.flush()


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"
