"""Work and memory the calibration no longer spends, with the same bits: a probed forward wanted only for its attention
mass stops at the last attention call, Linears fed the very same input (q/k/v, gate/up) share one statistic, and
calibration from cached block inputs folds each completed reduction slot into the total."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.shared import SharedInputs
from callbacks.prune import PruneCallback
from callbacks.reduction import SlotSums
from callbacks.sink_stats import SinkStatsCallback
from pipeline.maths.attention import AttentionMassProbe
from pipeline.model.calibration import find_blocks, forward_through_blocks, target_linears
from pipeline.model.module import DLMModule


def _module():
    module = DLMModule(pretrained="tiny-llada", timesteps=2, seed=0)
    module.configure_model()
    module.model.eval()
    return module


def _windows(n=4, length=32):
    return torch.randint(4, 4096, (n, length), generator=torch.Generator().manual_seed(3))


class LastBlockCalls(L.Callback):
    """Listed first: counts the calls of the last block's last Linear during the epoch's batches (after the callbacks'
    short set-up forwards, before any epoch-end work of PruneCallback)."""

    def __init__(self):
        self.calls, self.at_epoch_end = 0, None

    def on_train_start(self, trainer, pl_module):
        self.calls = 0

    def on_fit_start(self, trainer, pl_module):
        last = find_blocks(pl_module.model)[-1][1]
        linear = [m for m in last.modules() if isinstance(m, torch.nn.Linear)][-1]
        linear.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def on_train_epoch_end(self, trainer, pl_module):
        if self.at_epoch_end is None:
            self.at_epoch_end = self.calls


def _fit(tmp_path, method="sink_sparsegpt", flavor="default", batch_size=2, **prune_kwargs):
    module = DLMModule(pretrained="tiny-llada", timesteps=2, seed=0)
    counter, prune = LastBlockCalls(), PruneCallback(method=method, sparsity=0.5, flavor=flavor, **prune_kwargs)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[counter, SinkStatsCallback(record=False, heatmap=False), prune])
    data = [{"input_ids": w, "index": i, "keep": torch.zeros_like(w, dtype=torch.bool)} for i, w in enumerate(_windows())]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=batch_size))
    weights = {n: m.weight.detach().clone() for n, m in prune.layers.items()}
    return prune, weights, counter


def test_probe_with_last_call_gives_the_same_mass_and_skips_the_rest():
    module = _module()
    ids = _windows(2)
    after = []
    last = find_blocks(module.model)[-1][1]
    last.ff_out.register_forward_hook(lambda *a: after.append(1))
    with torch.no_grad(), AttentionMassProbe(per_layer=True) as full:
        forward_through_blocks(module, ids)
    assert len(after) == 1 and full.calls == len(find_blocks(module.model))
    with torch.no_grad(), AttentionMassProbe(per_layer=True, last_call=full.calls) as short:
        forward_through_blocks(module, ids)
    assert len(after) == 1, "the last block's MLP ran although only the attention mass was wanted"
    assert short.calls == full.calls
    assert torch.equal(short.mass, full.mass)
    assert all(torch.equal(a, b) for a, b in zip(short.per_layer, full.per_layer))


def test_shared_inputs_on_tiny_llada():
    module = _module()
    blocks = find_blocks(module.model)
    layers = target_linears(module.model)
    shared = SharedInputs.find(module, layers, blocks[-1][1], eager=True)
    expected = {}
    for prefix, _ in blocks:
        expected.update({f"{prefix}.k_proj": f"{prefix}.q_proj", f"{prefix}.v_proj": f"{prefix}.q_proj",
                         f"{prefix}.up_proj": f"{prefix}.ff_proj"})
    assert shared.members == expected
    x = torch.randn(2, 3)
    assert not shared.is_copy(f"{blocks[0][0]}.q_proj", x)
    assert shared.is_copy(f"{blocks[0][0]}.k_proj", x.detach())  # another view of the same memory
    with pytest.raises(RuntimeError, match="different input"):
        shared.is_copy(f"{blocks[0][0]}.v_proj", x.clone())


@pytest.mark.parametrize("method,flavor,mode", [("sink_sparsegpt", "default", "oneshot"), ("sink_wanda", "default", "oneshot"),
                                                ("sink_sparsegpt", "reference", "sequential")])
def test_shared_statistics_change_no_bit(tmp_path, monkeypatch, method, flavor, mode):
    shared, weights_shared, _ = _fit(tmp_path / "shared", method, flavor, mode=mode)
    assert shared.shared.members, "tiny-llada's q/k/v and ff/up projections should share their inputs"
    monkeypatch.setattr(SharedInputs, "find", classmethod(lambda cls, *a, **k: cls()))
    alone, weights_alone, _ = _fit(tmp_path / "alone", method, flavor, mode=mode)
    assert not alone.shared.members
    assert shared.masks.keys() == alone.masks.keys()
    for name in alone.masks:
        assert torch.equal(shared.masks[name], alone.masks[name]), name
        assert torch.equal(weights_shared[name], weights_alone[name]), name


def test_mass_only_forwards_stop_early_and_single_pass_ones_do_not(tmp_path):
    # flavor=reference SparseGPT: the calibration epoch wants only s̄ (its statistics come from clean block passes)
    prune, _, counter = _fit(tmp_path / "reference", "sink_sparsegpt", "reference")
    assert not prune.reads_probed_forward(0)
    assert counter.at_epoch_end == 1  # 4 probed forwards; only the first runs whole (it checks the number of calls)
    # the default flavour reads every layer's input off the probed forward: the probe must run it whole
    prune, _, counter = _fit(tmp_path / "default", "sink_sparsegpt", "default", mode="oneshot")
    assert counter.at_epoch_end == 2 * 2  # 2 batches x 2 timesteps, one forward each


def test_take_each_shares_a_total_and_frees_it():
    sums = SlotSums(2)
    for sid in range(3):
        sums.add("a", sid, torch.full((2,), float(sid)))
    pairs = list(sums.take_each(["a", "b", "c"], key=lambda n: "a" if n in ("a", "b") else n))
    assert [n for n, _ in pairs] == ["a", "b", "c"]
    assert pairs[0][1] is pairs[1][1] and torch.equal(pairs[0][1], torch.full((2,), 3.0, dtype=torch.float64))
    assert pairs[2][1] is None and "a" not in sums.sums


def test_slot_folding_gives_the_same_totals():
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 3, generator=g) for _ in range(7)]
    plain, folded = SlotSums(4), SlotSums(4)
    for sums in (plain, folded):
        for sid in sorted(range(7), key=lambda s: s % 4):  # slot by slot
            sums.accumulator("h", sid, (3, 3)).add_(values[sid])
            if sums is folded and (sid + 4 >= 7):  # the slot's last sample
                sums.fold(["h"], sid % 4 + 1)
    assert not folded.sums["h"], "every slot should have been folded and freed"
    assert torch.equal(plain.total("h"), folded.total("h"))
    assert torch.equal(plain.take("h"), folded.take("h"))
    with pytest.raises(RuntimeError, match="folded"):
        late = SlotSums(4)
        late.accumulator("h", 0, (3, 3))
        late.fold(["h"], 1)
        late.accumulator("h", 4, (3, 3))  # slot 0 again


def test_cached_calibration_folds_slots_without_changing_a_bit(tmp_path, monkeypatch):
    live = []
    accumulator = SlotSums.accumulator

    def counting(self, key, sample_id, *args, **kwargs):
        out = accumulator(self, key, sample_id, *args, **kwargs)
        live.append(len(self.sums[key]))
        return out

    monkeypatch.setattr(SlotSums, "accumulator", counting)
    folded, weights_folded, _ = _fit(tmp_path / "folded", "sink_sparsegpt", "reference", batch_size=1)
    assert max(live) == 1, "slot by slot, one slot of a layer alive at a time"
    live.clear()
    monkeypatch.setattr(SlotSums, "fold", lambda self, keys, upto: None)
    kept, weights_kept, _ = _fit(tmp_path / "kept", "sink_sparsegpt", "reference", batch_size=1)
    assert max(live) == 4  # 4 windows in 8 slots: every window its own slot, all alive until the solve
    for name in kept.masks:
        assert torch.equal(folded.masks[name], kept.masks[name]), name
        assert torch.equal(weights_folded[name], weights_kept[name]), name
