"""The calibration progress bar: the phase by name ("calibration", "calibration block 3/6"), noised windows
(windows × timesteps) done of the epoch's total, elapsed time and ETA, on rank zero.

SinkPruneCLI puts it in place of Lightning's default bar ("Epoch 0/0 … it/s"), unless the trainer has
enable_progress_bar=False or the recipe lists a progress bar of its own.  On a console that is not a terminal
(a batch job's log file) it prints plain lines instead (console.LineProgress).
"""
from __future__ import annotations

from lightning.pytorch.callbacks.progress import ProgressBar
from typing_extensions import override

from pipeline.run.protocols import DescribesCalibration, NoisesAtTimesteps, callbacks_of


def calibration_description(trainer) -> str:
    """The phase name: one-shot "calibration"; what a DescribesCalibration callback names the epoch (PruneCallback:
    "calibration block i/L", "calibration (sink scores)"); otherwise several epochs "calibration epoch e/E"."""
    epoch, epochs = trainer.current_epoch, trainer.max_epochs or 1
    for cb in callbacks_of(trainer, DescribesCalibration):
        if (name := cb.calibration_phase(epoch, epochs)) is not None:
            return name
    return "calibration" if epochs <= 1 else f"calibration epoch {epoch + 1}/{epochs}"


class CalibrationProgressBar(ProgressBar):
    def __init__(self):
        super().__init__()
        self._enabled, self._progress, self._task = True, None, None
        self._per_batch, self._total = 1, 0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self.is_enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        from pipeline.run.console import progress_display

        loader = trainer.train_dataloader
        timesteps = len(pl_module.timesteps) if isinstance(pl_module, NoisesAtTimesteps) else 1
        windows = len(loader.sampler) if getattr(loader, "sampler", None) is not None else len(loader.dataset)
        self._per_batch, self._total = (loader.batch_size or 1) * timesteps, windows * timesteps
        unit = "windows × timesteps" if timesteps > 1 else "windows"
        self._progress = progress_display(TextColumn("{task.description}"), BarColumn(bar_width=20),
                                          MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), TextColumn("ETA"),
                                          TimeRemainingColumn(), unit=unit)
        self._progress.start()
        self._task = self._progress.add_task(calibration_description(trainer), total=self._total)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=min(self._total, (batch_idx + 1) * self._per_batch))

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    @override
    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None
