"""The training log: one JSON object per line in output_dir/log.jsonl.

Records carry a "type": "step" (every --log_freq steps: loss, lr, wd, momentum, teacher
temperature and entropies, img/s), "epoch" (the epoch's means and time), "knn" (an evaluation,
with "epochs_trained") and "warning". `dino_fast.visualize.plot_training_curves` draws them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union


class JsonlLog:
    """Append-only JSON-lines log; each record is written and closed at once, so a crash loses
    nothing that was logged.

    Args:
        path: the log file (created on the first write).
        enabled: False makes every write a no-op (the non-zero ranks of a distributed run).

    Example:
        >>> log = JsonlLog("out/log.jsonl")           # doctest: +SKIP
        >>> log.write(type="epoch", epoch=0, loss=6.9)  # doctest: +SKIP
        >>> log.read()[-1]["loss"]                      # doctest: +SKIP
        6.9
    """

    def __init__(self, path: Union[str, os.PathLike], enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, **record) -> None:
        """Append one record (keyword arguments: JSON-serialisable values; NaN is allowed)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def read(self) -> list[dict]:
        """Every record, oldest first ([] when there is no log yet)."""
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def keep_epochs_before(self, epoch: int) -> None:
        """Rewrite the log with only the records of the first `epoch` epochs (0: empty it), so a
        resumed run continues the log of the epochs its checkpoint holds."""
        if not self.enabled:
            return
        kept = [r for r in self.read() if r.get("epoch", math.inf) < epoch
                or r.get("epochs_trained", math.inf) <= epoch] if epoch else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
