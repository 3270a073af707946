"""The training log: named rows of means since the last row, written to progress.csv and
TensorBoard (a column is a field, never a position).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LogRow:
    """One row of progress.csv (and of TensorBoard): means over the steps since the last row."""

    step: int
    losses: dict[str, float]  # "loss", then the objective's terms
    val_loss: float | None  # at a save with --val_dir
    steps_per_s: float
    wall_s: float
    lr: float

    @staticmethod
    def header(terms: tuple[str, ...]) -> list[str]:
        return ["step", "loss", *terms, "val_loss", "steps_per_s", "wall_s", "lr"]

    def cells(self) -> list:
        return [self.step, *self.losses.values(), "" if self.val_loss is None else self.val_loss,
                self.steps_per_s, self.wall_s, self.lr]


class TrainingLog:
    """progress.csv and TensorBoard (where installed), written by rank 0."""

    def __init__(self, csv_path: Path, append: bool, terms: tuple[str, ...], tensorboard=None):
        self.handle = open(csv_path, "a" if append else "w", newline="")
        self.writer = csv.writer(self.handle)
        if not append:
            self.writer.writerow(LogRow.header(terms))
        self.tensorboard = tensorboard

    def write(self, row: LogRow) -> None:
        self.writer.writerow(row.cells())
        self.handle.flush()
        if self.tensorboard is not None:
            for name, value in row.losses.items():
                self.tensorboard.add_scalar(f"train/{name}", value, row.step)
            if row.val_loss is not None:
                self.tensorboard.add_scalar("val/loss", row.val_loss, row.step)

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
