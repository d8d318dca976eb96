"""A test-only callback (listed in trainer.callbacks by class_path) that counts, on each rank of a real run, what
SparseGPT's reduction state holds where: the float32 slots and the slot being folded (what lives on the compute
device) and the float64 totals kept in host memory, sampled at every slot creation and every fold.

    SlotWatch(path)   writes path/rank<r>.json at the end of the fit:
        host_totals             whether the totals were in host memory
        peak_device_bytes       the most bytes of slots alive at once, the one being folded included
        float64_on_device       float64 matrices seen among the slots (a Hessian total on the device would be one; an
                                MoE expert's token count is a float64 scalar slot by design)
        peak_total_bytes        the most bytes of float64 totals at once
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from callbacks.reduction import SlotSums


class SlotWatch(Callback):
    def __init__(self, path: str):
        self.path = path

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.counts = {"host_totals": None, "peak_device_bytes": 0, "float64_on_device": 0, "peak_total_bytes": 0}
        self.originals = SlotSums.accumulator, SlotSums._fold_slot
        accumulator, fold_slot = self.originals

        def watched_accumulator(sums, *args, **kwargs):
            out = accumulator(sums, *args, **kwargs)
            self._sample(sums)
            return out

        def watched_fold_slot(sums, key, out, g, value):
            self._sample(sums, value)
            return fold_slot(sums, key, out, g, value)

        SlotSums.accumulator, SlotSums._fold_slot = watched_accumulator, watched_fold_slot

    def _sample(self, sums: SlotSums, folding: torch.Tensor | None = None) -> None:
        slots = [t for per_key in sums.sums.values() for t in per_key.values()] + ([folding] if folding is not None else [])
        totals = [t for _, t in sums.folded.values() if t is not None]
        c = self.counts
        c["host_totals"] = sums.host_totals
        c["peak_device_bytes"] = max(c["peak_device_bytes"], sum(t.numel() * t.element_size() for t in slots))
        c["float64_on_device"] += sum(t.dtype == torch.float64 and t.dim() == 2 for t in slots)
        c["peak_total_bytes"] = max(c["peak_total_bytes"], sum(t.numel() * t.element_size() for t in totals))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        SlotSums.accumulator, SlotSums._fold_slot = self.originals
        Path(self.path).mkdir(parents=True, exist_ok=True)
        (Path(self.path) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.counts))
