"""The contracts between the LightningModule, the callbacks and the later stages, declared once.

A callback takes part in calibration by subclassing the protocols it implements (the defaults do nothing), and
is found by `isinstance`, never by probing attribute names:

    NoisedBatchHooks      on_noised_batch_start (sink scores are set here), then on_noised_batch (statistics)
                          for every noised version of a calibration batch (pipeline/model/calibration.py)
    SinkScoreConsumer     tells SinkStatsCallback whether an epoch needs sink scores and whether it reads
                          the probed forward's activations (else the probe may stop at the last attention call)
    DescribesCalibration  names the calibration epochs for the progress bar ("calibration block 3/6")
    PublishesPruneOutcome publishes a PruneOutcome (pipeline/run/outcome.py) when calibration ends
    ChecksContracts       checks the run against its contracts: its place in trainer.callbacks, the module it reads,
                          settings against the world size (at setup, and in preflight before the run folder exists)
    ChoosesFlavor         chooses the run's flavour (pipeline/maths/flavors.py), which the module's noise and
                          SinkStatsCallback's operations follow (`run_flavor`)
    SizesCalibrationMemory  names the statistic it keeps per layer and its reduction slots (the module's memory plan)
    WritesCheckpoints     writes a checkpoint the run can resume from (the out-of-memory line names it)
    SavesModel            saves the model (a quantizing run needs the compressed-tensors writer before any work)
    KnowsBlockCalls       knows whether every block takes block 0's arguments (found for its block-by-block passes)

The message they receive is a NoisedBatch.  What the callbacks read from the module: CalibrationModule (and
ScoresHeldout to score held-out text); optional, each found by isinstance: OffloadsBlocks (`module_offloader`),
NoisesAtTimesteps, ReportsMemory, GuardsMemory.  From the datamodule: HeldoutData, OrdersBySlot, SkipsBatches.
`check_contracts` (at setup, and in preflight) fails with one line when the run breaks a contract.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from pipeline.maths.flavors import DEFAULT, Flavor
from pipeline.run.outcome import PruneOutcome


@dataclass
class NoisedBatch:
    input_ids: torch.Tensor          # x_t [B, L]
    clean_ids: torch.Tensor          # x_0 [B, L]
    masked: torch.Tensor             # bool [B, L], positions replaced by the mask token
    t: float                         # the timestep
    step: int                        # index of t in the schedule
    sample_ids: list[int]            # global indices of the windows (for seeding and DDP-exact reductions)
    attention_mask: torch.Tensor | None = None
    sink_scores: torch.Tensor | None = None   # [B, L], set by SinkStatsCallback
    extras: dict = field(default_factory=dict)


@runtime_checkable
class CalibrationModule(Protocol):
    """What the callbacks read from the LightningModule: the network and the id the forward process writes.
    `calibration_forward(input_ids, attention_mask)` runs the network on a window (DLMModule's, or
    `model(input_ids=..., attention_mask=...)` for a module without one: see CalibrationForward)."""
    model: torch.nn.Module
    mask_token_id: int


@runtime_checkable
class CalibrationForward(Protocol):
    def calibration_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None): ...


@runtime_checkable
class ScoresHeldout(Protocol):
    """A module that scores held-out text: {"nll", "ppl", "tokens"}, and per-window (nll, tokens) afterwards."""
    heldout_windows: dict

    def score_heldout(self, description: str | None = None) -> dict: ...


@runtime_checkable
class NoisedBatchHooks(Protocol):
    def on_noised_batch_start(self, trainer, pl_module, nb: NoisedBatch) -> None:
        """Before any on_noised_batch of this batch: sink scores are published here (nb.sink_scores)."""

    def on_noised_batch(self, trainer, pl_module, nb: NoisedBatch) -> None:
        """After every on_noised_batch_start: statistics that read the sink scores."""


@runtime_checkable
class SinkScoreConsumer(Protocol):
    def wants_sink_scores(self, epoch: int) -> bool:
        """False: this epoch needs no sink scores from this callback (SinkStatsCallback may skip its probe)."""
        return True

    def reads_probed_forward(self, epoch: int) -> bool:
        """True: the callback reads activations of the probed forward, so the probe must run every block."""
        return True

    def weights_by_sink_scores(self) -> bool:
        """True: its statistics are weighted by 1 - sink score (only then does the positional-sink warning apply)."""
        return True


@runtime_checkable
class DescribesCalibration(Protocol):
    def calibration_phase(self, epoch: int, epochs: int) -> str | None:
        """The progress bar's name for this epoch, or None for the plain "calibration epoch e/E"."""


@runtime_checkable
class PublishesPruneOutcome(Protocol):
    @property
    def prune_outcome(self) -> PruneOutcome | None:
        """The PruneOutcome once calibration has ended, None before."""


@runtime_checkable
class ChecksContracts(Protocol):
    def check_contracts(self, trainer, pl_module) -> None:
        """One-line error if the run breaks this object's contracts: its place and company in trainer.callbacks, the
        module it reads, its settings against the world size.  Reads no weights (the model is not loaded yet)."""


def check_contracts(trainer, pl_module) -> None:
    """Every contract of the module and the callbacks (preflight runs it before the run folder exists)."""
    for owner in (pl_module, *trainer.callbacks):
        if isinstance(owner, ChecksContracts):
            owner.check_contracts(trainer, pl_module)


@runtime_checkable
class SizesCalibrationMemory(Protocol):
    def calibration_memory(self) -> tuple[str | None, int | None]:
        """(the statistic kept per targeted layer, e.g. "hessian", or None; its reduction slots, None: the default)."""


@runtime_checkable
class WritesCheckpoints(Protocol):
    def last_checkpoint(self, trainer) -> Path:
        """The checkpoint a stopped run resumes from (it may not exist yet)."""


@runtime_checkable
class SavesModel(Protocol):
    save_model: bool


@runtime_checkable
class KnowsBlockCalls(Protocol):
    def blocks_called_alike(self) -> bool | None:
        """Whether every block is called with block 0's arguments (callbacks/cached.py's uniform_block_calls), found
        for its own block-by-block passes; None when it has not looked."""


# --- what the callbacks may read from the module and the datamodule, when they offer it --------------------
@runtime_checkable
class OffloadsBlocks(Protocol):
    offloader: object  # pipeline/model/offload.py's BlockOffloader, or None while the blocks stay on the device


def module_offloader(pl_module):
    """The module's BlockOffloader; None for a resident model or a module that never offloads."""
    return pl_module.offloader if isinstance(pl_module, OffloadsBlocks) else None


@runtime_checkable
class NoisesAtTimesteps(Protocol):
    timesteps: list  # the calibration's timesteps: each window is noised once per timestep (the progress bar's count)


@runtime_checkable
class ReportsMemory(Protocol):
    def memory_report(self) -> dict:
        """The memory plan with the measured peaks beside it (results.json `memory`)."""


@runtime_checkable
class GuardsMemory(Protocol):
    def out_of_memory_guard(self):
        """A context manager that turns a device out-of-memory error into one line with the fix."""


@runtime_checkable
class HeldoutData(Protocol):
    def heldout_dataloader(self): ...


@runtime_checkable
class OrdersBySlot(Protocol):
    def order_by_slot(self, slots: int, regroup: bool = True) -> bool:
        """Calibration windows slot by slot for `slots` reduction slots; True when the order is taken."""


@runtime_checkable
class SkipsBatches(Protocol):
    def skip_batches(self, n: int) -> None:
        """Resume: the next calibration epoch starts after its first n batches."""


@runtime_checkable
class ChoosesFlavor(Protocol):
    flavor: Flavor


def run_flavor(trainer) -> Flavor:
    """The flavour the run's callbacks chose (PruneCallback's `flavor`), the default when none chose one."""
    chosen = {cb.flavor.name: cb.flavor for cb in callbacks_of(trainer, ChoosesFlavor)}
    if len(chosen) > 1:
        raise ValueError(f"trainer.callbacks choose flavours {', '.join(sorted(chosen))}; use one")
    return next(iter(chosen.values()), DEFAULT)


def callbacks_of(trainer, protocol) -> list:
    return [cb for cb in trainer.callbacks if isinstance(cb, protocol)]


def outcome_publisher(trainer) -> PublishesPruneOutcome | None:
    """The one callback that publishes a PruneOutcome (None: a dense-only run)."""
    found = callbacks_of(trainer, PublishesPruneOutcome)
    if len(found) > 1:
        raise ValueError(f"trainer.callbacks lists {len(found)} pruning callbacks ({', '.join(type(c).__name__ for c in found)}); "
                         "keep one")
    return found[0] if found else None


def find_outcome(trainer) -> PruneOutcome | None:
    """The run's PruneOutcome: None when no callback prunes; an error when asked before calibration has ended."""
    publisher = outcome_publisher(trainer)
    if publisher is None:
        return None
    if publisher.prune_outcome is None:
        raise RuntimeError(f"{type(publisher).__name__} has not published its PruneOutcome yet (it does when calibration "
                           "ends); read it in on_train_end or later, from a callback listed after it")
    return publisher.prune_outcome


def check_listed_after(trainer, callback, protocol, why: str) -> None:
    """One line if a callback of `protocol` is listed after `callback` (it would run its hooks too late)."""
    index = trainer.callbacks.index(callback)
    late = [cb for cb in trainer.callbacks[index + 1:] if isinstance(cb, protocol)]
    if late:
        raise ValueError(f"trainer.callbacks: {type(late[0]).__name__} is listed after {type(callback).__name__}, "
                         f"which {why}; list it before")


def check_module(pl_module, who: str) -> None:
    """One line if the LightningModule lacks what the callbacks read (CalibrationModule)."""
    # hasattr, not isinstance(pl_module, CalibrationModule): from Python 3.12 isinstance reads a protocol's data members
    # with inspect.getattr_static, which never sees an nn.Module's submodules (they live in `_modules`)
    if not all(hasattr(pl_module, name) for name in CalibrationModule.__annotations__):
        raise ValueError(f"{who} needs a LightningModule with `model` and `mask_token_id` (CalibrationModule in "
                        f"pipeline/run/protocols.py); {type(pl_module).__name__} lacks them: use pipeline.model.module.DLMModule")
