"""Sums over calibration samples that come out bit-identical for any number of DDP ranks.

Float addition is not associative, so "each rank sums its shard, then all-reduce" gives answers that
depend on the world size, and masks near a tie flip.  Here sample i is added to slot i % G (G fixed,
default 8) and every slot lives on rank (slot % world_size).  With world_size dividing G, slot g sees the
same samples in the same order on any world size; the final sum adds slots 0..G-1 in order on every rank.
Memory: G / world_size copies of the statistic per rank (Hessian slots are float32, summed in float64).  A single
process that fills the slots one after another (calibration from cached block inputs, each batch in one slot) folds
each completed slot into the float64 total at once (`fold`): the same additions in the same order, one slot alive.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.run.strategy import dist_ready


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist_ready() else (0, 1)


class SlotSums:
    def __init__(self, slots: int = 8):
        rank, size = world()
        if slots % size:
            raise ValueError(
                f"reduction_slots={slots} is not a multiple of world_size={size}; set the callback's "
                f"reduction_slots to a multiple of the number of processes (e.g. {size * ((slots + size - 1) // size)})"
            )
        self.slots = slots
        self.owned = [g for g in range(slots) if g % size == rank]
        self.sums: dict[str, dict[int, torch.Tensor]] = {}
        self.folded: dict[str, tuple[int, torch.Tensor | None]] = {}  # key -> (slots < this are in the total, total)

    def slot_of(self, sample_id: int) -> int:
        return sample_id % self.slots

    def _slot(self, sample_id: int, key: str | None = None) -> int:
        slot = sample_id % self.slots
        if slot not in self.owned:
            raise RuntimeError(f"sample {sample_id} reached a rank that does not own slot {slot}: use the UnpaddedDistributedSampler")
        if key is not None and slot < self.folded.get(key, (0, None))[0]:
            raise RuntimeError(f"sample {sample_id} reached slot {slot} of {key} after that slot was folded into the total")
        return slot

    def fold(self, keys: list[str], upto: int) -> None:
        """Single process: slots < upto of each key are complete; add them to its float64 total (slot order, as
        `total` does) and free them.  A no-op under DDP, where `total` gathers the slots from their ranks."""
        if dist_ready():
            return
        for key in dict.fromkeys(keys):
            done, out = self.folded.get(key, (0, None))
            per_key = self.sums.get(key, {})
            for g in range(done, upto):
                if g in per_key:
                    slot = per_key.pop(g)
                    out = slot.to(torch.float64, copy=True) if out is None else out.add_(slot)  # (= out + slot, bitwise)
            self.folded[key] = (max(done, upto), out)

    def accumulator(self, key: str, sample_id: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        """The running sum of sample_id's slot, created as zeros, for callers that add into it in place."""
        per_key = self.sums.setdefault(key, {})
        slot = self._slot(sample_id, key)
        if slot not in per_key:
            per_key[slot] = torch.zeros(shape, dtype=dtype, device=device)
        return per_key[slot]

    def add(self, key: str, sample_id: int, value: torch.Tensor) -> None:
        slot = self._slot(sample_id, key)
        per_key = self.sums.setdefault(key, {})
        if slot in per_key:
            per_key[slot] += value
        else:
            per_key[slot] = value.to(torch.float64, copy=True)

    def total(self, key: str, like: torch.Tensor | None = None) -> torch.Tensor | None:
        """Σ over slots in slot order; identical on every rank.  Collective: call on all ranks."""
        per_key = self.sums.get(key, {})
        if not dist_ready():
            return self._local_total(key, copy=True)
        size = dist.get_world_size()
        template = next(iter(per_key.values()), like)
        shapes = [None] * size
        dist.all_gather_object(shapes, None if template is None else (tuple(template.shape), template.dtype))
        shape, dtype = next(s for s in shapes if s is not None)
        device = template.device if template is not None else torch.device("cpu")
        out = None
        for g in range(self.slots):
            owner = g % size
            present = torch.tensor([1 if g in per_key else 0], device=device)
            dist.broadcast(present, src=owner)
            if not present.item():
                continue
            buf = per_key[g].clone() if g in per_key else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=owner)
            out = buf.to(torch.float64) if out is None else out + buf
        return out

    def _local_total(self, key: str, copy: bool) -> torch.Tensor | None:
        per_key = self.sums.get(key, {})
        done, out = self.folded.get(key, (0, None))
        out = out.clone() if copy and out is not None else out
        for g in range(done, self.slots):
            if g in per_key:
                out = per_key[g].to(torch.float64, copy=True) if out is None else out.add_(per_key[g])
        return out

    def take(self, key: str) -> torch.Tensor | None:
        """total(key), then the key's slots are freed (collective)."""
        out = self.total(key) if dist_ready() else self._local_total(key, copy=False)
        self.sums.pop(key, None)
        self.folded.pop(key, None)
        return out

    def take_each(self, names: list[str], key=lambda name: name):
        """(name, total of key(name)) for each name in order: a key is taken at its first name (collective, the same
        order on every rank) and its total dropped after its last, so names sharing a key share one total."""
        last = {key(n): i for i, n in enumerate(names)}
        totals = {}
        for i, name in enumerate(names):
            k = key(name)
            if k not in totals:
                totals[k] = self.take(k)
            yield name, totals[k]
            if last[k] == i:
                del totals[k]

    def clear(self) -> None:
        self.sums.clear()
        self.folded.clear()

    def state_dict(self) -> dict:
        return {"slots": self.slots, "sums": {k: {g: t.cpu() for g, t in v.items()} for k, v in self.sums.items()},
                "folded": {k: (g, None if t is None else t.cpu()) for k, (g, t) in self.folded.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.slots = state["slots"]
        self.sums = {k: dict(v) for k, v in state["sums"].items()}
        self.folded = dict(state.get("folded", {}))


def gather_records(records: dict) -> dict:
    """Merge per-rank dicts keyed by sample id (each key lives on one rank), identically on every rank."""
    if not dist_ready():
        return dict(sorted(records.items()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    merged = {}
    for part in gathered:
        merged.update(part)
    return dict(sorted(merged.items()))
