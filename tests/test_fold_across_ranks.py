"""SlotSums under DDP with host totals: the completed slots are folded round by round (each broadcast by its owner,
added in slot order into a float64 total in host memory on every rank) and give the one-process totals bit for bit,
for plain float32 slots, running means and float64 scalars, with slots that some rank never filled."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks.cached import _folds
from callbacks.reduction import SlotSums

SAMPLES, SLOTS = 7, 4  # slots 0-2 get two samples, slot 3 one; on 2 ranks rank 1 owns slots 1 and 3


def _value(sample: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sample)) * 10 ** (sample % 5)


def _fill_and_take(sums: SlotSums, rank: int, size: int) -> dict:
    fold = _folds(sums, ["h", "r", "n#tokens"], major=True)
    mine = sorted((s for s in range(SAMPLES) if s % SLOTS % size == rank), key=lambda s: (s % SLOTS, s))  # slot by slot
    for s in mine:
        fold(s % SLOTS)
        sums.accumulator("h", s, (5, 5)).add_(_value(s, (5, 5)))
        mean, seen = sums.running("r", s, (3,))
        mean.mul_(seen / (seen + 1)).add_(_value(s + 100, (3,)) / (seen + 1))
        if s % 3:  # (a statistic some samples never reach: an expert no token of theirs was routed to)
            sums.add("n#tokens", s, torch.tensor(float(s)))
    fold(None)
    # every slot folded (none waits on the device); the totals are float64 in host memory
    assert not any(sums.sums.values())
    totals = {k: t for k, (_, t) in sums.folded.items() if t is not None}
    assert sorted(totals) == ["h", "n#tokens", "r"]
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in totals.values())
    return {k: sums.take(k) for k in ("h", "r", "n#tokens")}


def _rank(rank: int, size: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=size)
    try:
        sums = SlotSums(SLOTS, host_totals=True)
        totals = _fill_and_take(sums, rank, size)
        assert not sums.sums and not sums.folded  # every slot folded, every total handed out
        torch.save(totals, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_fold_into_host_totals_equal_one_process(tmp_path):
    one = _fill_and_take(SlotSums(SLOTS, host_totals=True), 0, 1)
    resident = _fill_and_take(SlotSums(SLOTS, host_totals=False), 0, 1)
    path, out = os.path.join(str(tmp_path), "store"), str(tmp_path / "totals")
    mp.start_processes(_rank, args=(2, path, out), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        two = torch.load(f"{out}.{rank}")
        for key in one:
            assert two[key].dtype == torch.float64 and two[key].device.type == "cpu"
            assert torch.equal(one[key], two[key]) and torch.equal(one[key], resident[key]), (rank, key)
