"""Sums over calibration samples that come out bit-identical for any number of DDP ranks.

Float addition is not associative, so "each rank sums its shard, then all-reduce" gives answers that
depend on the world size, and masks near a tie flip.  Here sample i is added to slot i % G (G fixed,
default 8) and every slot lives on rank (slot % world_size).  With world_size dividing G, slot g sees the
same samples in the same order on any world size; the final sum adds slots 0..G-1 in order on every rank.
Memory: G / world_size copies of the statistic per rank (Hessian slots are float32, summed in float64).  A single
process that fills the slots one after another (calibration from cached block inputs, or windows dispatched slot by
slot: `CalibrationData.order_by_slot`) folds each completed slot into the float64 total at once (`fold`): the same
additions in the same order, one slot alive.  `host_totals`: the float64 totals live in host memory (a one-shot run
holds every block's; float64 addition gives the same bits on any device), added on one worker thread while the
device goes on.
A key filled through `running` holds a running mean per slot (the reference's SparseGPT Hessian): its total is
Σ_g n_g·mean_g / Σ_g n_g, which is the one slot's mean itself, bit for bit, when a single slot holds every sample.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from pipeline.model.memory_plan import totals_fit
from pipeline.run.strategy import dist_ready

SLOT_TOTALS = {"host": (True, True), "device": (False, None)}  # SINKPRUNE_SLOT_TOTALS -> (host_totals, fold_thread)


MAX_DIMS = 4  # of a statistic broadcast by `_fold_across_ranks`
FOLD_DTYPES = [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16]


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist_ready() else (0, 1)


def comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: the rank's GPU under NCCL, else host memory."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank (collective under DDP)."""
    if not dist_ready():
        return flag
    value = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def check_slots(slots: int, size: int, field: str = "reduction_slots") -> None:
    """Every rank owns the same number of slots (slot g lives on rank g % world_size)."""
    if slots % size:
        raise ValueError(f"{field}={slots} is not a multiple of world_size={size}; set it to a multiple of the number "
                         f"of processes (e.g. {size * ((slots + size - 1) // size)})")


def forced_totals() -> tuple[bool, bool | None] | None:
    """(host_totals, fold_thread) that SINKPRUNE_SLOT_TOTALS forces, None when unset."""
    value = os.environ.get("SINKPRUNE_SLOT_TOTALS", "").strip().lower()
    if value and value not in SLOT_TOTALS:
        raise ValueError(f"SINKPRUNE_SLOT_TOTALS={value!r} is not one of {', '.join(SLOT_TOTALS)}; unset it to let the "
                         "free device memory decide where SparseGPT's float64 Hessian totals live")
    return SLOT_TOTALS.get(value)


def device_room(device: torch.device) -> tuple[int, int]:
    """(bytes the device can still allocate, the largest transient seen so far: the peak above what is held now)."""
    held = torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - held
    return free, torch.cuda.max_memory_allocated(device) - held


class SlotSums:
    def __init__(self, slots: int = 8, host_totals: bool | None = False, fold_thread: bool | None = None):
        rank, size = world()
        check_slots(slots, size)
        if host_totals is None and (forced := forced_totals()) is not None:
            host_totals, fold_thread = forced
        self.slots, self.host_totals = slots, host_totals  # None: decided at the first fold (_place_totals)
        self.owned = [g for g in range(slots) if g % size == rank]
        self.sums: dict[str, dict[int, torch.Tensor]] = {}
        self.folded: dict[str, tuple[int, torch.Tensor | None]] = {}  # key -> (slots < this are in the total, total)
        self.counts: dict[str, dict[int, int]] = {}  # running-mean keys: key -> slot -> samples in its mean
        # host totals of device slots: the additions run on one thread while the device goes on (None: for slots on a
        # device only; a CPU run keeps its own threads to its forwards)
        self.fold_thread, self._worker, self._pending = fold_thread, None, []
        self._host_buffers: dict[tuple, list[torch.Tensor]] = {}  # (shape, dtype) -> host copies the thread is done with

    def __getstate__(self) -> dict:  # (pickled for DDP spawn: no thread)
        self.settle()
        return {**self.__dict__, "_worker": None, "_pending": [], "_host_buffers": {}}

    def _later(self, fn) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-fold")
        self._pending.append(self._worker.submit(fn))

    def _host_copy(self, value: torch.Tensor) -> torch.Tensor:
        """A device slot copied to a host buffer of its shape, one the fold thread is done with where there is one:
        fresh host memory would cost a page fault every 4 KiB of every slot."""
        free = self._host_buffers.setdefault((tuple(value.shape), value.dtype), [])
        buffer = free.pop() if free else torch.empty(value.shape, dtype=value.dtype)
        return buffer.copy_(value)

    def _host_add(self, out: torch.Tensor, value: torch.Tensor, first: bool) -> None:
        """On the fold thread: out = value (first) or out += value, in float64 a few MiB at a time (one float64 copy of
        a whole slot would be fresh memory again), then the buffer goes back for the next slot."""
        rows = max(1, (1 << 19) // max(1, value[0].numel() if value.dim() > 1 else 1))
        for o, v in zip(out.split(rows), value.split(rows)) if value.dim() else [(out, value)]:
            o.copy_(v) if first else o.add_(v.double())
        self._host_buffers[(tuple(value.shape), value.dtype)].append(value)

    def settle(self) -> None:
        """Wait for the host additions under way (in submission order, one thread); every reader of a total calls it."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def slot_of(self, sample_id: int) -> int:
        return sample_id % self.slots

    def _slot(self, sample_id: int, key: str | None = None) -> int:
        slot = sample_id % self.slots
        if slot not in self.owned:
            raise RuntimeError(f"sample {sample_id} reached a rank that does not own slot {slot}: use the UnpaddedDistributedSampler")
        if key is not None and slot < self.folded.get(key, (0, None))[0]:
            raise RuntimeError(f"sample {sample_id} reached slot {slot} of {key} after that slot was folded into the total")
        return slot

    def _term(self, key: str, slot: int, value: torch.Tensor) -> torch.Tensor:
        """A slot's float64 term of the total: the slot itself, or n_g · mean_g for a running-mean key."""
        out = value.to(torch.float64, copy=True)
        return out.mul_(self.counts[key][slot]) if key in self.counts else out

    def _plus(self, key: str, out: torch.Tensor | None, slot: int, value: torch.Tensor) -> torch.Tensor:
        """out + slot's term, in place.  A plain slot is added as it is: float64 += float32 converts each value exactly
        first, so the bits equal adding its float64 copy, without that copy on the device (8 bytes per value more at
        the peak); in host memory it is converted first (CPU adds of mixed dtypes are ~3x slower)."""
        if out is None or key in self.counts:
            term = self._term(key, slot, value)
            return term if out is None else out.add_(term.to(out.device))
        value = value.to(out.device)
        return out.add_(value.double() if value.device.type == "cpu" else value)

    def _finish(self, key: str, out: torch.Tensor | None) -> torch.Tensor | None:
        return out.div_(sum(self.counts[key].values())) if out is not None and key in self.counts else out

    def _place_totals(self, device: torch.device) -> None:
        """host_totals=None: the float64 totals of every key held now stay on the device when they fit its free memory."""
        if device.type != "cuda":
            self.host_totals = False  # (the compute device is the host: add in place)
            return
        need = sum(8 * next(iter(per_key.values())).numel() for per_key in self.sums.values() if per_key)
        self.host_totals = not totals_fit(need, *device_room(device))

    @property
    def across_ranks(self) -> bool:
        """DDP with the float64 totals in host memory: completed slots are folded collectively (`_fold_across_ranks`)."""
        return dist_ready() and self.host_totals is True

    def fold(self, keys: list[str], upto: int) -> None:
        """Slots < upto of each key are complete; add them to its float64 total (slot order, as `total` does) and free
        them.  Under DDP a collective when the totals live in host memory (every rank calls it with the same keys and
        `upto`), else a no-op: `total` gathers the slots from their ranks."""
        if dist_ready():
            if self.host_totals is True:
                self._fold_across_ranks(keys, upto)
            return
        for key in dict.fromkeys(keys):
            done, out = self.folded.get(key, (0, None))
            per_key = self.sums.get(key, {})
            for g in range(done, upto):
                if g not in per_key:
                    continue
                if self.host_totals is None:
                    self._place_totals(per_key[g].device)
                out = self._fold_slot(key, out, g, per_key.pop(g))  # (the slot is freed before the next one is made)
            self.folded[key] = (max(done, upto), out)

    def _fold_slot(self, key: str, out: torch.Tensor | None, g: int, value: torch.Tensor) -> torch.Tensor:
        """out + slot g's term (`value`), where the totals live: host totals of device slots on the fold thread."""
        threaded = self.fold_thread if self.fold_thread is not None else value.device.type != "cpu"
        if self.host_totals and threaded and key not in self.counts:  # the same operations as _plus, on the thread
            value = self._host_copy(value)
            first, out = out is None, torch.empty(value.shape, dtype=torch.float64) if out is None else out
            self._later(lambda out=out, value=value, first=first: self._host_add(out, value, first))
            return out
        return self._plus(key, out, g, value.cpu() if self.host_totals else value)

    def _fold_across_ranks(self, keys: list[str], upto: int) -> None:
        """DDP, host totals: each slot < upto is broadcast by its owner (a header first: samples, dtype, shape; 0 when
        it holds none) and every rank adds it to its own float64 total in host memory, in slot order: the additions of
        `total`, so the same bits on every rank and world size.  On the device: the owned slots not yet folded and
        the one slot being broadcast."""
        size, device = dist.get_world_size(), comm_device()
        for key in dict.fromkeys(keys):
            done, out = self.folded.get(key, (0, None))
            per_key = self.sums.get(key, {})
            for g in range(done, upto):
                mine = per_key.pop(g, None)
                header = torch.full((2 + MAX_DIMS,), -1, dtype=torch.int64)
                header[0] = 0
                if mine is not None:
                    header[0] = -self.counts[key][g] if key in self.counts else 1
                    header[1] = FOLD_DTYPES.index(mine.dtype)
                    header[2:2 + mine.dim()] = torch.tensor(mine.shape, dtype=torch.int64)
                header = header.to(device)
                dist.broadcast(header, src=g % size)
                n, code, *dims = header.tolist()
                if not n:
                    continue
                buf = mine.to(device) if mine is not None else torch.empty(
                    [d for d in dims if d >= 0], dtype=FOLD_DTYPES[code], device=device)
                del mine
                dist.broadcast(buf, src=g % size)
                if n < 0:  # a running mean of -n samples: its term is -n · mean
                    self.counts.setdefault(key, {})[g] = -n
                out = self._fold_slot(key, out, g, buf)
            self.folded[key] = (max(done, upto), out)

    def accumulator(self, key: str, sample_id: int, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        """The running sum of sample_id's slot, created as zeros, for callers that add into it in place."""
        per_key = self.sums.setdefault(key, {})
        slot = self._slot(sample_id, key)
        if slot not in per_key:
            per_key[slot] = torch.zeros(shape, dtype=dtype, device=device)
        return per_key[slot]

    def running(self, key: str, sample_id: int, shape, device=None) -> tuple[torch.Tensor, int]:
        """(the float32 running mean of sample_id's slot, the samples already in it); counts this sample in."""
        acc = self.accumulator(key, sample_id, shape, device=device)
        per_slot = self.counts.setdefault(key, {})
        slot = self.slot_of(sample_id)
        seen = per_slot.get(slot, 0)
        per_slot[slot] = seen + 1
        return acc, seen

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
        if self.across_ranks:  # the slots not folded yet are folded now; the total is the host one
            self.fold([key], self.slots)
        if not dist_ready() or self.across_ranks:
            return self._local_total(key, copy=True)
        size = dist.get_world_size()
        template = next(iter(per_key.values()), like)
        shapes = [None] * size
        dist.all_gather_object(shapes, None if template is None else (tuple(template.shape), template.dtype))
        shape, dtype = next(s for s in shapes if s is not None)
        device = template.device if template is not None else torch.device("cpu")
        out, count, running = None, 0, False
        for g in range(self.slots):
            owner = g % size
            # 1: a plain slot; -n: a running mean of n samples; 0: no such slot
            flag = (-self.counts[key][g] if key in self.counts else 1) if g in per_key else 0
            present = torch.tensor([flag], device=device)
            dist.broadcast(present, src=owner)
            n = int(present.item())
            if not n:
                continue
            buf = per_key[g].clone() if g in per_key else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=owner)
            term = buf.to(torch.float64) * -n if n < 0 else buf
            out, count, running = (term.to(torch.float64) if out is None else out + term), count - n, running or n < 0
        return out / count if running and out is not None else out

    def _local_total(self, key: str, copy: bool) -> torch.Tensor | None:
        self.settle()
        per_key = self.sums.get(key, {})
        done, out = self.folded.get(key, (0, None))
        out = out.clone() if copy and out is not None else out
        for g in range(done, self.slots):
            if g in per_key:
                out = self._plus(key, out, g, per_key[g])
        return self._finish(key, out)

    def take(self, key: str) -> torch.Tensor | None:
        """total(key), then the key's slots are freed (collective)."""
        if self.across_ranks:
            self.fold([key], self.slots)
        out = self.total(key) if dist_ready() and not self.across_ranks else self._local_total(key, copy=False)
        self.sums.pop(key, None)
        self.folded.pop(key, None)
        self.counts.pop(key, None)
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
        self.settle()
        if self._worker is not None:  # its thread would otherwise idle for the life of the process
            self._worker.shutdown(wait=True)
            self._worker = None
        self.sums.clear()
        self.folded.clear()
        self.counts.clear()
        self._host_buffers.clear()

    def state_dict(self) -> dict:
        self.settle()
        return {"slots": self.slots, "sums": {k: {g: t.cpu() for g, t in v.items()} for k, v in self.sums.items()},
                "folded": {k: (g, None if t is None else t.cpu()) for k, (g, t) in self.folded.items()},
                "counts": {k: dict(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.settle()
        self.slots = state["slots"]
        self.sums = {k: dict(v) for k, v in state["sums"].items()}
        self.folded = dict(state.get("folded", {}))
        self.counts = {k: dict(v) for k, v in state.get("counts", {}).items()}


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
