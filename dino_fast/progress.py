"""A one-line progress bar for the training loop, and the JSON-lines training log.

The bar redraws in place (carriage return) at most every `min_interval` seconds; it is silent
when disabled (non-zero ranks, or stdout not a terminal, where a log file would fill with
redraws: the loop prints one summary line per epoch instead).
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_metric(value) -> str:
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.3e}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


class ProgressBar:
    """`desc [#####.....] 12/50 00:03<00:09 loss 3.21 lr 1.2e-04 ... 120 img/s`."""

    def __init__(self, total: int, desc: str = "", enabled: Optional[bool] = None,
                 file: TextIO = None, min_interval: float = 0.5):
        self.total, self.desc = total, desc
        self.file = file if file is not None else sys.stdout
        self.enabled = self.file.isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self.start = time.perf_counter()
        self._last_draw = -math.inf

    def update(self, done: int, force: bool = False, **metrics) -> None:
        """Show `done` of `total` steps and the given metrics (name=value)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and done < self.total and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        width = 20
        filled = int(width * done / max(self.total, 1))
        text = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"{format_duration(elapsed)}<{format_duration(eta)} "
                + " ".join(f"{k} {format_metric(v)}" for k, v in metrics.items()))
        columns = shutil.get_terminal_size((120, 20)).columns
        self.file.write("\r" + text[:columns - 1].ljust(columns - 1))
        self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.write("\n")
            self.file.flush()


class JsonlLog:
    """Append one JSON object per line to `path` (each line is flushed: a crash loses nothing)."""

    def __init__(self, path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]
