"""The training loop's progress bar: a tqdm bar per epoch on a terminal, silent elsewhere.

On a terminal the bar redraws in place with the step count, the time left and the latest logged
metrics. Where stdout is not a terminal (a log file, a CI job) and on non-zero ranks nothing is
drawn: the training loop prints one summary line per epoch instead, so logs hold no redraws.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

from tqdm import tqdm

# desc, a 16-character bar, steps, elapsed < remaining time, then the metrics
BAR_FORMAT = "{desc} [{bar:16}] {n_fmt}/{total_fmt} {elapsed}<{remaining}{postfix}"


def format_metric(value) -> str:
    """A metric for the bar: floats with 4 significant digits (scientific below 1e-2)."""
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.3e}" if abs(value) < 1e-2 else f"{value:.4g}"
    return str(value)


class ProgressBar:
    """`epoch 3/30 [######          ] 24/62 00:03<00:05, loss 6.21 lr 1.200e-03 img/s 310`.

    Args:
        total: number of steps of the epoch.
        desc: text before the bar.
        enabled: draw or not; None: only when `file` is a terminal.
        file: where to draw (default: sys.stdout).
        min_interval: least seconds between two redraws.

    Example:
        >>> bar = ProgressBar(len(loader), desc="epoch 1/10")   # doctest: +SKIP
        >>> for step, batch in enumerate(loader):                # doctest: +SKIP
        ...     bar.update(step + 1, loss=loss.item())
        >>> bar.close()                                          # doctest: +SKIP
    """

    def __init__(self, total: int, desc: str = "", enabled: Optional[bool] = None,
                 file: Optional[TextIO] = None, min_interval: float = 0.5):
        file = file if file is not None else sys.stdout
        self.enabled = file.isatty() if enabled is None else enabled
        self._bar = tqdm(total=total, desc=desc, file=file, mininterval=min_interval,
                         disable=not self.enabled, ascii=True, leave=True,
                         dynamic_ncols=file.isatty(), bar_format=BAR_FORMAT)

    def update(self, done: int, **metrics) -> None:
        """Show `done` of `total` steps and the given metrics (name=value, in this order)."""
        if not self.enabled:
            return
        self._bar.set_postfix_str(" ".join(f"{k} {format_metric(v)}" for k, v in metrics.items()),
                                  refresh=False)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        """Draw the final state and end the line."""
        self._bar.close()
