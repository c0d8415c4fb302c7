"""TensorBoard logs of a run (``bestformer train --log tensorboard``, issue 23), beside its CSV and PNG.

Event files go into the run folder (``runs/<name>/tensorboard/``; a teacher's into its own folder). Every epoch
adds, at step = epoch: ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``, ``accuracy/val_top5``,
``lr``, ``grad_norm``, ``firing_rate/mean`` and one ``firing_rate/<layer>`` per spiking layer (the monitor's
sampled rates); at the end, the profile's totals (``profile/energy_uJ``, ``profile/sops``, ``profile/size_kB``,
...). A resumed run continues the same files: what a crash left after the resume point is purged.
Needs the optional ``tensorboard`` package (``pip install 'bestformer[tensorboard]'``); open with
``tensorboard --logdir runs``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: metrics.csv column -> TensorBoard tag
_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
         "val_acc": "accuracy/val", "val_top5": "accuracy/val_top5", "lr": "lr", "grad_norm": "grad_norm",
         "firing_rate": "firing_rate/mean", "time_steps": "time_steps"}
#: profile.json key -> (tag, scale)
_PROFILE = {"energy_pj": ("profile/energy_uJ", 1e-6), "sops": ("profile/sops", 1.0),
            "ns_ace": ("profile/ns_ace", 1.0), "model_size_mb": ("profile/size_kB", 1e3),
            "mean_firing_rate": ("profile/mean_firing_rate", 1.0), "macs": ("profile/macs", 1.0)}


class TensorBoardLog:
    """Writes a run's epochs to TensorBoard event files under ``folder``."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--log tensorboard needs the optional tensorboard package: pip install "
                              "'bestformer[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.folder = folder
        self.writer: Any = None
        self.last_epoch = 0

    def _open(self, first_epoch: int) -> Any:
        if self.writer is None:  # purge what a crashed process wrote past the point this one resumes from
            self.writer = self._writer_class(str(self.folder), purge_step=first_epoch)
        return self.writer

    def epochs(self, history: list[dict[str, Any]], firing: list[dict[str, float]]) -> None:
        """Write the rows of ``history`` (metrics.csv) and ``firing`` (firing_rates.csv) not written yet."""
        new = [row for row in history if row["epoch"] > self.last_epoch]
        if not new:
            return
        writer = self._open(new[0]["epoch"])
        rates = {int(r["epoch"]): r for r in firing}
        for row in new:
            step = int(row["epoch"])
            for column, tag in _TAGS.items():
                value = row.get(column)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(tag, value, step)
            for layer, rate in rates.get(step, {}).items():
                if layer != "epoch" and isinstance(rate, (int, float)) and math.isfinite(rate):
                    writer.add_scalar(f"firing_rate/{layer}", rate, step)
            self.last_epoch = step
        writer.flush()

    def profile(self, totals: dict[str, Any], epoch: int) -> None:
        """The profile's totals (``profile.json``), at the run's last epoch ``epoch``. Opened only now (a resumed
        run that had finished its epochs), the files keep every epoch up to ``epoch``."""
        writer = self._open(epoch + 1)
        for key, (tag, scale) in _PROFILE.items():
            value = totals.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(tag, value * scale, epoch)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
