"""SparseGPT's Hessians in one process: the calibration windows arrive slot by slot and each completed reduction slot is
folded into its float64 total, so one float32 slot per layer is alive instead of G (8 by default), with the same bits.

The digests were recorded on main before this change (commit 2f99424): sha256 of every mask and every pruned weight.
With 6 windows in 4 slots the order changes (0, 4, 1, 5, 2, 3 in batches of one), unlike the golden cases (4 windows
in 8 slots)."""
from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from callbacks.prune import PruneCallback
from callbacks.reduction import SlotSums
from callbacks.sink_stats import SinkStatsCallback
from pipeline.model.data import CalibrationData, slot_major_order
from pipeline.model.module import DLMModule
from tests.runs import run_inprocess, tiny_config

MAIN_DIGESTS = {  # tiny-llada, sink_sparsegpt, 6 windows of 32 tokens, 2 timesteps, reduction_slots 4
    "oneshot": "969b850af4e93ede405328e72c7b8c237452c5f3f889253cf909d52a64070d56",
    "sequential": "25c0a7830185b4c848ce6258bc96a359fd15a1d089eb18498b6d22b4a2831dc2",
}


def _digest(root) -> str:
    h = hashlib.sha256()
    for file in ("masks.safetensors", "model/model.safetensors"):
        tensors = load_file(str(root / "pruned" / file))
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Peak:
    """The most float32 slots alive at once (of one layer, of all layers) and the most bytes SlotSums held (slots and
    float64 totals), sampled whenever a slot is created."""

    def __init__(self, monkeypatch):
        self.per_layer = self.all_layers = self.bytes = 0
        self.sums: list[SlotSums] = []
        accumulator = SlotSums.accumulator

        def counting(sums, key, sample_id, *args, **kwargs):
            out = accumulator(sums, key, sample_id, *args, **kwargs)
            slots = [t for per_key in sums.sums.values() for t in per_key.values()]
            totals = [t for _, t in sums.folded.values() if t is not None]
            self.per_layer = max(self.per_layer, len(sums.sums[key]))
            self.all_layers = max(self.all_layers, len(slots))
            self.bytes = max(self.bytes, sum(t.numel() * t.element_size() for t in slots + totals))
            if sums not in self.sums:
                self.sums.append(sums)
            return out

        monkeypatch.setattr(SlotSums, "accumulator", counting)


def _fit(tmp_path, name, mode="oneshot", batch_size=1, extra_callbacks=(), *cli_args):
    root = tmp_path / name
    config = tiny_config(root, method="sink_sparsegpt", pretrained="tiny-llada", nsamples=6, seqlen=32, timesteps=2,
                         batch_size=batch_size, prune_args={"reduction_slots": 4, "mode": mode})
    config["trainer"]["callbacks"] += list(extra_callbacks)
    code, err = run_inprocess(config, tmp_path, *cli_args)
    return root, code, err


def test_slot_major_order_keeps_each_slot_and_batch():
    for n, slots, batch in [(6, 4, 1), (6, 4, 2), (16, 8, 4), (10, 8, 4), (5, 4, 2), (17, 8, 1), (4, 8, 2)]:
        order = slot_major_order(n, slots, batch)
        assert sorted(order) == list(range(n))
        for s in range(slots):  # each slot sees its windows in increasing order
            mine = [i for i in order if i % slots == s]
            assert mine == sorted(mine)
        batches = [order[k:k + batch] for k in range(0, n, batch)]
        assert all(len({i % slots for i in b}) == len(b) for b in batches), "two windows of one slot share a batch"
        lowest = [min(i % slots for i in b) for b in batches]
        assert lowest == sorted(lowest)  # a batch starting at slot s folds the slots below: none of them comes again
        if batch == 1:
            assert [i % slots for i in order] == sorted(i % slots for i in order), "one slot alive at a time"
    assert slot_major_order(6, 4, 1) == [0, 4, 1, 5, 2, 3]
    assert slot_major_order(8, 4, 3) is None  # [0, 1, 2], [4, 5, 6], then 3 and 7 (one slot) would share a batch


@pytest.mark.parametrize("mode, totals", [("oneshot", "host"), ("oneshot", "device"), ("sequential", "")])
def test_one_slot_alive_and_the_same_bits(tmp_path, monkeypatch, mode, totals):
    """One-shot: the float64 totals folded on the device (in place, as a GPU keeps them when they fit its memory) and in
    host memory on the worker thread (as a GPU does when they do not) give the same bits; sequential: on the device."""
    monkeypatch.setenv("SINKPRUNE_SLOT_TOTALS", totals)
    peak = Peak(monkeypatch)
    root, code, err = _fit(tmp_path, "folded", mode)
    assert code == 0, err[-3000:]
    assert _digest(root) == MAIN_DIGESTS[mode]
    assert peak.per_layer == 1, f"{peak.per_layer} float32 slots of one layer alive at once"
    assert peak.sums[0].host_totals == (totals == "host")
    assert peak.sums[0].fold_thread == (True if totals == "host" else None)
    folded = (peak.all_layers, peak.bytes)

    # the order main used (windows 0..5): every slot alive until the solve, the same masks and weights
    monkeypatch.setattr(CalibrationData, "order_by_slot", lambda self, *a, **k: False)
    peak.per_layer = peak.all_layers = peak.bytes = 0
    root, code, err = _fit(tmp_path, "unordered", mode)
    assert code == 0, err[-3000:]
    assert _digest(root) == MAIN_DIGESTS[mode]
    assert peak.per_layer == 4 and peak.all_layers == 4 * folded[0]
    assert folded[1] < peak.bytes / 1.3, (folded[1], peak.bytes)


def test_batches_of_two_keep_the_bits(tmp_path, monkeypatch):
    """6 windows in batches of two: (0, 1), (4, 5), (2, 3); at most two slots of a layer under way at once."""
    peak = Peak(monkeypatch)
    root, code, err = _fit(tmp_path, "pairs", "oneshot", batch_size=2)
    assert code == 0, err[-3000:]
    assert _digest(root) == MAIN_DIGESTS["oneshot"]
    assert peak.per_layer == 2


def test_resume_after_a_fold_gives_the_same_bits(tmp_path):
    ckpt = {"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt")}}
    stop = {"class_path": "tests.test_resume.InterruptAfter", "init_args": {"batches": 3}}  # windows 0, 4, 1: slot 0 folded
    _, code, _ = _fit(tmp_path, "resumed", "oneshot", 1, [ckpt, stop])
    assert code != 0
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    sums = next(v for k, v in state["callbacks"].items() if k.startswith("PruneCallback"))["sums"]
    assert all(done == 1 for done, _ in sums["folded"].values()) and sums["folded"]
    assert all(set(per_key) == {1} for per_key in sums["sums"].values())
    root, code, err = _fit(tmp_path, "resumed", "oneshot", 1, [ckpt], "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert code == 0, err[-3000:]
    assert _digest(root) == MAIN_DIGESTS["oneshot"]


def _fit_windows(tmp_path, windows, **data):
    module = DLMModule(pretrained="tiny-llada", timesteps=2, seed=0)
    prune = PruneCallback(method="sink_sparsegpt", sparsity=0.5, reduction_slots=4)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
    trainer.fit(module, **data)
    return prune.masks, {n: m.weight.detach().clone() for n, m in prune.layers.items()}


def test_given_windows_arrive_slot_by_slot(tmp_path, monkeypatch):
    """CalibrationData.from_windows (what a benchmark with its own token windows uses) orders them like the corpus
    windows; a plain DataLoader keeps its order and every slot.  The same masks and weights."""
    windows = torch.randint(4, 4096, (6, 32), generator=torch.Generator().manual_seed(3))
    peak = Peak(monkeypatch)
    masks, weights = _fit_windows(tmp_path / "ordered", windows, datamodule=CalibrationData.from_windows(windows))
    assert peak.per_layer == 1
    peak.per_layer = 0
    data = [{"input_ids": w, "index": i, "keep": torch.zeros_like(w, dtype=torch.bool)} for i, w in enumerate(windows)]
    plain_masks, plain_weights = _fit_windows(tmp_path / "plain", windows,
                                              train_dataloaders=torch.utils.data.DataLoader(data, batch_size=1))
    assert peak.per_layer == 4
    assert masks.keys() == plain_masks.keys()
    for name in masks:
        assert torch.equal(masks[name], plain_masks[name]), name
        assert torch.equal(weights[name], plain_weights[name]), name


def test_host_totals_fold_on_a_thread_to_the_same_bits():
    import copy
    import pickle

    g = torch.Generator().manual_seed(0)
    values = [torch.randn(5, 5, generator=g) * 10.0 ** float(torch.randint(-6, 6, (), generator=g)) for _ in range(11)]
    plain, host = SlotSums(4), SlotSums(4, host_totals=True, fold_thread=True)  # (by default: device slots only)
    for sums in (plain, host):
        for sid in slot_major_order(11, 4, 1):
            if sums is host:
                sums.fold(["h"], sid % 4)
            sums.accumulator("h", sid, (5, 5)).add_(values[sid])
            if sums is host and sid == 6:  # a checkpoint (and a DDP-spawn pickle) with additions under way
                state, spawned = copy.deepcopy(sums.state_dict()), pickle.loads(pickle.dumps(sums))  # (saved at once)
                assert state["folded"]["h"][0] == 2 and spawned._worker is None
    assert host.folded["h"][1].device.type == "cpu" and len(host.sums["h"]) == 1
    assert torch.equal(plain.total("h"), host.total("h"))
    assert torch.equal(plain.take("h"), host.take("h"))
    resumed = SlotSums(4, host_totals=True, fold_thread=True)
    resumed.load_state_dict(state)
    for sid in slot_major_order(11, 4, 1)[8:]:  # after the checkpoint (slot order: 0 4 8 1 5 9 2 6 | 10 3 7)
        resumed.fold(["h"], sid % 4)
        resumed.accumulator("h", sid, (5, 5)).add_(values[sid])
    assert torch.equal(resumed.take("h"), _plain_total(values, 4))


def test_host_totals_add_large_slots_in_rows_into_reused_buffers():
    """A slot larger than one block of rows (here three blocks) is added a block of rows at a time, with the same bits as
    one float64 addition; its host copy goes into the buffer of the slot before once the thread is done with it."""
    g = torch.Generator().manual_seed(1)
    values = [torch.randn(1300, 1000, generator=g) * 10.0 ** float(torch.randint(-6, 6, (), generator=g)) for _ in range(6)]
    vectors = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(6)]
    plain, host = SlotSums(3), SlotSums(3, host_totals=True, fold_thread=True)
    for sums in (plain, host):
        for sid in slot_major_order(6, 3, 1):
            if sums is host:
                sums.fold(["h", "v"], sid % 3)
                sums.settle()  # (the thread done with the buffer: the next slot reuses it)
            sums.accumulator("h", sid, values[sid].shape).add_(values[sid])
            sums.add("v", sid, vectors[sid])
    buffers = host._host_buffers[((1300, 1000), torch.float32)]
    assert len(buffers) == 1 and host.folded["h"][0] == 2
    assert torch.equal(plain.take("h"), host.take("h")) and torch.equal(plain.take("v"), host.take("v"))


def test_totals_stay_on_the_device_when_they_fit(monkeypatch):
    """host_totals=None (one-shot) decides at the first fold: a CPU run adds in place; on a CUDA device the totals of
    every key held then stay there when they fit its free memory after the transient peak, else go to host memory."""
    from callbacks import reduction
    from pipeline.model.memory_plan import HEADROOM, totals_fit

    monkeypatch.delenv("SINKPRUNE_SLOT_TOTALS", raising=False)
    sums = SlotSums(4, host_totals=None)
    for sid in (0, 4, 1):
        sums.fold(["a", "b"], sid % 4)
        sums.accumulator("a", sid, (6, 6)).add_(1.0)
        sums.accumulator("b", sid, (3,), dtype=torch.float64).add_(1.0)
    assert sums.host_totals is False and sums.folded["a"][1].device.type == "cpu"
    need = 8 * (36 + 3)
    assert totals_fit(need, int((need + 100) / HEADROOM) + 1, 100) and not totals_fit(need, need, 100)
    for room, on_host in [((10**9, 10**6), False), ((need, 0), True), ((10**9, 10**9), True)]:
        monkeypatch.setattr(reduction, "device_room", lambda device, room=room: room)
        cuda = SlotSums(4, host_totals=None)
        cuda.sums = {"a": {0: torch.zeros(6, 6)}, "b": {0: torch.zeros(3, dtype=torch.float64)}}
        cuda._place_totals(torch.device("cuda"))
        assert cuda.host_totals is on_host, room
    monkeypatch.setenv("SINKPRUNE_SLOT_TOTALS", "device")
    assert SlotSums(4, host_totals=None).host_totals is False
    assert SlotSums(4, host_totals=True).host_totals is True  # (a caller's explicit choice stands)
    monkeypatch.setenv("SINKPRUNE_SLOT_TOTALS", "gpu")
    with pytest.raises(ValueError, match="SINKPRUNE_SLOT_TOTALS='gpu' is not one of host, device"):
        SlotSums(4, host_totals=None)


def _plain_total(values, slots):
    sums = SlotSums(slots)
    for sid in range(len(values)):
        sums.accumulator("h", sid, values[sid].shape).add_(values[sid])
    return sums.take("h")


def test_a_bad_slot_totals_setting_is_one_line_before_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKPRUNE_SLOT_TOTALS", "gpu")
    root, code, err = _fit(tmp_path, "bad", "oneshot")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, err[-2000:]
    assert "SINKPRUNE_SLOT_TOTALS='gpu' is not one of host, device" in errors[0]
    assert not (root / "pruned").exists()
