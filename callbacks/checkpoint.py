"""CalibrationCheckpoint: save the run every N calibration batches, so a long calibration can resume.

Lightning's ModelCheckpoint counts optimizer steps, and calibration takes none, so it never fires here.
This saves `trainer.save_checkpoint` (which holds every callback's `state_dict`: sink records, statistic
sums, which (sample, timestep) pairs were already added) to a temp file and renames it into place.
`sinkprune fit ... --checkpoint` adds one (dirpath: <run folder>/checkpoints); resume with the same command and
`--ckpt_path <dirpath>/last.ckpt` (a stopped run prints the exact command).  The callbacks skip pairs
they have already counted, so a resumed run adds every pair exactly once, in the same order, and gives
bit-identical masks however Lightning replays the interrupted epoch.
"""
from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from pipeline.run.protocols import SkipsBatches, WritesCheckpoints


class CalibrationCheckpoint(Callback, WritesCheckpoints):
    def __init__(self, dirpath: str | None = None, every_n_batches: int = 1):
        """dirpath: where last.ckpt goes (default <trainer.default_root_dir>/checkpoints)."""
        if every_n_batches < 1:
            raise ValueError(f"CalibrationCheckpoint.every_n_batches={every_n_batches} must be >= 1")
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_n_batches = every_n_batches
        self.epoch, self.batches = 0, 0  # batches fully counted in that epoch
        self._resume_at: tuple[int, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning calls on_train_start on a resume but not on_train_epoch_start of the interrupted epoch.
        if self._resume_at is None:
            return
        epoch, batches = self._resume_at
        self._resume_at = None
        if epoch == trainer.current_epoch and batches:
            if not isinstance(trainer.datamodule, SkipsBatches):
                raise RuntimeError("resuming mid-epoch needs a datamodule with skip_batches(n), like CalibrationData")
            trainer.datamodule.skip_batches(batches)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch, self.batches = trainer.current_epoch, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.batches % self.every_n_batches == 0:
            self.save(trainer)

    def folder(self, trainer) -> Path:
        return (self.dirpath or Path(trainer.default_root_dir) / "checkpoints").expanduser()

    def last_checkpoint(self, trainer) -> Path:
        return self.folder(trainer) / "last.ckpt"

    def save(self, trainer) -> Path:
        folder = self.folder(trainer)
        target = self.last_checkpoint(trainer)
        tmp = folder / f".last.ckpt.tmp-{os.getpid()}"
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, target)
        return target

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Resume as a fresh start of this epoch whose sampler skips the counted batches: Lightning's own
        # mid-epoch restart with a plain DataLoader does not replay the remaining batches reliably.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress is not None:
            for key in progress["current"]:
                progress["current"][key] = 0
            progress["is_last_batch"] = False

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch, self.batches = state_dict.get("epoch", 0), state_dict.get("batches", 0)
        self._resume_at = (self.epoch, self.batches)
