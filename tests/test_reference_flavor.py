"""flavor="reference" against the float64 oracle of the reference's formulas (tests/reference_formulas.py).

Each test runs the flavour on tiny-llada (batch size 1, as the reference), records every noised batch and its
sink scores, then recomputes the masks with the oracle from the same model and the same inputs.
"""
from __future__ import annotations

from dataclasses import replace

import lightning as L
import pytest
import torch

from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.maths.flavors import REFERENCE, make_pruner, register
from pipeline.model.calibration import find_blocks
from pipeline.model.module import DLMModule
from pipeline.run.protocols import NoisedBatchHooks
from tests import reference_formulas as ref

NSAMPLES, SEQLEN, TIMESTEPS = 6, 128, 2


class Recorder(L.Callback, NoisedBatchHooks):
    """Listed after PruneCallback: keeps every noised batch (ids, sink scores) in dispatch order, epoch 0 only."""

    def __init__(self):
        self.batches = []

    def on_noised_batch(self, trainer, pl_module, nb):
        if trainer.current_epoch == 0:
            self.batches.append((list(nb.sample_ids), nb.input_ids.clone(), nb.clean_ids.clone(), nb.sink_scores.clone()))


def _windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 4096, (NSAMPLES, SEQLEN), generator=g)


def _run(method: str, tmp_path, noise_order: str = "per_sample", **prune_kwargs):
    """flavor reference (per-sample noise), or reference-exact (noise_order "reference": also the reference's noise
    order, mass and score operations and one slot)."""
    module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
    flavor = "reference-exact" if noise_order == "reference" else "reference"
    prune = PruneCallback(method=method, sparsity=0.5, flavor=flavor, **prune_kwargs)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), prune, recorder])
    loader = torch.utils.data.DataLoader([{"input_ids": w, "index": i, "keep": torch.zeros_like(w, dtype=torch.bool)} for i, w in enumerate(_windows())], batch_size=1)
    trainer.fit(module, train_dataloaders=loader)
    return module, prune, recorder


def _dense_model():
    module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
    module.configure_model()
    return module.model.eval()


def _linear_inputs(model, ids, names):
    """Each named Linear's input [1, T, d_in] for one forward of `ids` (whole model)."""
    modules = dict(model.named_modules())
    got = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, i[0].detach().clone())) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return got


def _agreement(a, b):
    return float((a == b).double().mean())


@pytest.mark.parametrize("noise_order", ["per_sample", "reference"])
def test_sink_wanda_reference_matches_oracle(tmp_path, noise_order):
    # one reduction slot (flavor reference-exact chooses it by itself): one float32 sum in dispatch order
    module, prune, recorder = _run("sink_wanda", tmp_path, noise_order, single_pass=True,
                                   **({"reduction_slots": 1} if noise_order == "per_sample" else {}))
    assert prune.mode == "oneshot" and len(recorder.batches) == NSAMPLES * TIMESTEPS
    dense = _dense_model()
    names = list(prune.masks)
    per_layer = {n: [] for n in names}
    for _, ids, _, scores in recorder.batches:
        for n, x in _linear_inputs(dense, ids, names).items():
            per_layer[n].append((x, scores))
    worst = 1.0
    for n in names:
        weight = dict(dense.named_modules())[n].weight.detach()
        # float32 in the reference's order: Σ over (window, t) of torch.norm over the window's rows, mask by topk
        total = torch.zeros(weight.shape[1])
        for x, s in per_layer[n]:
            total += torch.norm((x * (1.0 - s).unsqueeze(-1).to(x.dtype)).reshape(-1, x.shape[-1]).float(), p=2, dim=0)
        metric = weight.abs() * total.reshape(1, -1)
        expected32 = torch.zeros_like(metric, dtype=torch.bool)
        expected32.scatter_(1, torch.topk(metric, metric.shape[1] // 2, dim=1, largest=False).indices, True)
        assert torch.equal(prune.masks[n], expected32), n
        expected = ref.sink_wanda_mask(weight, ref.wanda_norm_sum(per_layer[n]), 0.5)
        worst = min(worst, _agreement(prune.masks[n], expected))
    # against the float64 oracle: only near-ties at the threshold may swap
    print("worst agreement", worst)
    assert worst >= 0.999, worst


def test_sink_wanda_reference_honours_n_m(tmp_path):
    _, prune, _ = _run("sink_wanda", tmp_path, n_m="2:4")
    mask = next(iter(prune.masks.values()))
    assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


def _fasterprune(weight, hessian, sparsity, blocksize=128, percdamp=0.01, dtype=torch.float64, n_m=None):
    """The reference's fasterprune (docs/reference.md) in `dtype`: returns (mask (True = pruned), W).  Unstructured:
    one threshold per column block; n_m=(N, M): at each group's first column, the N lowest saliencies of the group."""
    W = weight.to(dtype).clone()
    H = hessian.to(dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.diag(H).mean())  # the mean of a contiguous copy (a strided one sums in another order)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = Hinv1.diagonal()
        if n_m is None:
            mask1 = ref.blockwise_threshold_mask(W1 ** 2 / d.unsqueeze(0) ** 2, sparsity, blocksize)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                sal = W1[:, i:i + n_m[1]] ** 2 / d[i:i + n_m[1]].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(sal, n_m[0], dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return mask, W


def _running_hessian32(inputs, scores):
    """SparseGPT's running average in float32, one window at a time: H ← H·j/(j+1) + (√(2/(j+1))·x̃)ᵀ(√(2/(j+1))·x̃)."""
    d = inputs[0].shape[-1]
    H = torch.zeros(d, d)
    for j, (x, s) in enumerate(zip(inputs, scores)):
        y = x * (1 - s.float()).unsqueeze(-1)
        H *= j / (j + 1)
        y = (2 / (j + 1)) ** 0.5 * y
        H += y.T @ y
    return H


@pytest.mark.parametrize("noise_order", ["per_sample", "reference"])
def test_sink_sparsegpt_reference_matches_oracle(tmp_path, noise_order):
    # one reduction slot: one running mean over every window in order, as the reference (flavor reference-exact
    # chooses it by itself in one process)
    module, prune, recorder = _run("sink_sparsegpt", tmp_path, noise_order,
                                   **({"reduction_slots": 1} if noise_order == "per_sample" else {}))
    assert prune.reduction_slots == 1
    assert prune.mode == "sequential" and prune.offset == 1
    # s̄ per sample from the recorded scores (the scores epoch), in the timesteps' order
    per_sample = {}
    for sids, _, clean, scores in recorder.batches:
        per_sample.setdefault(sids[0], [clean, []])[1].append(scores[0])
    mean = {sid: ref.mean_over_timesteps(s) for sid, (_, s) in per_sample.items()}
    for sid, m in mean.items():  # the callback's own s̄ agrees
        got = prune.mean_scores.sums[sid][0] / prune.mean_scores.sums[sid][1]
        assert torch.allclose(got.double(), m, atol=1e-6)
    # block by block: the dense block i after the flavour's pruned blocks 0..i-1, on the clean windows
    oracle_model = _dense_model()
    pruned = dict(module.model.named_modules())
    modules = dict(oracle_model.named_modules())
    worst64 = 1.0
    for prefix, block in find_blocks(oracle_model):
        names = [n for n in prune.masks if n.startswith(prefix + ".")]
        inputs = {n: [] for n in names}
        for sid, (clean, _) in sorted(per_sample.items()):
            for n, x in _linear_inputs(oracle_model, clean, names).items():
                inputs[n].append(x[0])
        for n in names:
            weight = modules[n].weight.detach()
            scores = [prune.mean_scores.sums[sid][0] / prune.mean_scores.sums[sid][1] for sid in sorted(per_sample)]
            # float32, the reference's order of operations: the same bits
            mask32, weight32 = _fasterprune(weight, _running_hessian32(inputs[n], scores), 0.5, dtype=torch.float32)
            assert torch.equal(prune.masks[n], mask32), n
            assert torch.equal(prune.pruned_weights[n], weight32), n
            # float64 Hessian and solve: only saliencies within rounding of their block's threshold may swap
            h64 = ref.weighted_hessian(inputs[n], [mean[sid] for sid in sorted(per_sample)])
            worst64 = min(worst64, _agreement(prune.masks[n], _fasterprune(weight, h64, 0.5)[0]))
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(pruned[n].weight)
    print("worst agreement with the float64 oracle", worst64)
    assert worst64 >= 0.999, worst64


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_reference_baselines_schedule(method):
    pruner = make_pruner(method, 0.5, flavor="reference")
    assert pruner.flavor == "reference"
    if method != "magnitude":
        assert (pruner.mode, pruner.inputs) == ("sequential", "clean")


def test_layerwise_magnitude_matches_oracle():
    from pipeline.maths.reference import layerwise_magnitude_mask

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layerwise_magnitude_mask(w, 0.5), ref.layerwise_threshold_mask(w, 0.5))


def test_blockwise_sparsegpt_mask_rule():
    from pipeline.maths.reference import fasterprune

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 64, generator=g), torch.randn(200, 64, generator=g)
    H = x.T @ x
    pruned, mask, _ = fasterprune(w, H, sparsity=0.5, blocksize=32)
    expected_mask, expected_weight = _fasterprune(w, H, 0.5, blocksize=32, dtype=torch.float32)
    assert torch.equal(mask, expected_mask) and torch.equal(pruned, expected_weight)
    rows = mask.sum(1)
    assert rows.min() < rows.max()  # one threshold per block over all rows: rows vary
    assert _agreement(mask, _fasterprune(w, H, 0.5, blocksize=32)[0]) >= 0.999
    H[5] = H[:, 5] = 0  # a dead input, and 2:4
    pruned, mask, info = fasterprune(w, H, n_m=(2, 4), blocksize=32)
    expected_mask, expected_weight = _fasterprune(w, H, None, blocksize=32, dtype=torch.float32, n_m=(2, 4))
    assert torch.equal(mask, expected_mask) and torch.equal(pruned, expected_weight) and info["dead_inputs"] == 1
    assert (mask.reshape(16, -1, 4).sum(-1) == 2).all() and (pruned[:, 5] == 0).all()


def _collector_mass(model, ids):
    """The reference's `attn_collector`, test-local: every attention call's q and k (F.sdpa's arguments, key heads
    repeated), softmax(q·kᵀ/√hd) in float32 summed over queries then heads, added over layers onto zeros."""
    import math

    import torch.nn.functional as F

    mass, real = torch.zeros(ids.shape), F.scaled_dot_product_attention

    def collect(q, k, v, *args, **kwargs):
        kk = k.repeat_interleave(q.size(1) // k.size(1), dim=1) if k.size(1) != q.size(1) else k
        mass.add_(torch.softmax((torch.matmul(q, kk.transpose(-2, -1)) / math.sqrt(q.size(-1))).float(), dim=-1)
                  .sum(dim=2).sum(dim=1))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = collect
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        F.scaled_dot_product_attention = real
    return mass


def test_reference_noise_order_gives_the_reference_sink_scores(tmp_path):
    """flavor reference-exact: each noised batch's sink scores are the reference's, bit for bit: its collector's mass
    and sigmoid(alpha·(mass − (mean + 2·population std)))."""
    _, _, recorder = _run("sink_wanda", tmp_path, "reference")
    dense = _dense_model()
    for _, ids, _, scores in recorder.batches:
        mass = _collector_mass(dense, ids)
        expected = torch.sigmoid(5.0 * (mass - (mass.mean(dim=1, keepdim=True) + 2.0 * mass.std(dim=1, keepdim=True, unbiased=False))))
        assert torch.equal(scores, expected)


def test_reference_noise_order_replays_the_global_generator():
    """flavor reference-exact: the k-th draw after manual_seed(seed) noises (window k // n_t, timestep k % n_t)."""
    from pipeline.maths.diffusion import timestep_grid
    from pipeline.model.calibration import reference_noised_batches

    windows, steps, eps = _windows(), timestep_grid(10), 1e-3
    gen = torch.Generator().manual_seed(0)
    ours = [nb.input_ids for i, w in enumerate(windows)
            for nb in reference_noised_batches({"input_ids": w[None], "index": [i]}, steps, 2, gen, eps=eps)]
    state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(0)  # the reference's loop (docs/reference.md, "Diffusion noise")
        theirs = []
        for w in windows:
            ids = w[None]
            for step in range(5, 55, 5):
                p = (1 - eps) * (step / 50) + eps
                theirs.append(torch.where(torch.rand_like(ids.float()) < p, torch.full_like(ids, 2), ids))
    finally:
        torch.random.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and len(ours) == len(theirs)


def test_wanda_variant_matches_a_literal_bisection():
    """use_variant: per row, prune where the cumulative sorted metric ≤ alpha · row sum; alpha bisected on [0, 0.8]."""
    from pipeline.maths.reference import wanda_variant_mask

    metric = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)).double()

    def given(alpha):
        mask = torch.zeros_like(metric, dtype=torch.bool)
        for r in range(metric.shape[0]):
            values = sorted(float(v) for v in metric[r])
            total, running, thresh = float(metric[r].sum()), 0.0, None
            for v in values:
                running += v
                if running <= alpha * total:
                    thresh = v
            if thresh is not None:
                mask[r] = metric[r] <= thresh
        return mask, float(mask.double().mean())

    alpha, low, high = 0.4, 0.0, 0.8
    mask, cur = given(alpha)
    while abs(cur - 0.5) > 0.001 and high - low >= 0.001:
        alpha, low, high = ((alpha + low) / 2, low, alpha) if cur > 0.5 else ((alpha + high) / 2, alpha, high)
        mask, cur = given(alpha)
    got, got_alpha = wanda_variant_mask(metric, 0.5)
    assert got_alpha == pytest.approx(alpha) and _agreement(got, mask) >= 0.999
    with pytest.raises(ValueError, match="use_variant"):
        make_pruner("wanda", 0.5, flavor="default", use_variant=True)
    assert make_pruner("wanda", 0.5, flavor="reference", use_variant=True).use_variant


def test_wanda_reference_clean_sequential_matches_oracle(tmp_path):
    """Plain Wanda, flavor=reference: clean windows, block by block through the already pruned blocks, |W|·√Σx²."""
    module, prune, recorder = _run("wanda", tmp_path, use_variant=False)
    assert prune.mode == "sequential" and prune.offset == 0
    clean = {sids[0]: c for sids, _, c, _ in recorder.batches}
    oracle_model, pruned = _dense_model(), dict(module.model.named_modules())
    modules = dict(oracle_model.named_modules())
    for prefix, _ in find_blocks(oracle_model):
        names = [n for n in prune.masks if n.startswith(prefix + ".")]
        sq = {n: 0 for n in names}
        for sid in sorted(clean):
            for n, x in _linear_inputs(oracle_model, clean[sid], names).items():
                sq[n] = sq[n] + (x[0].double() ** 2).sum(0)
        for n in names:
            expected = ref.per_row_lowest(modules[n].weight.detach().double().abs() * sq[n].sqrt(), modules[n].weight.shape[1] // 2)
            assert _agreement(prune.masks[n], expected) >= 0.999, n
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(pruned[n].weight)


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_reference_baselines_run(tmp_path, method):
    _, prune, _ = _run(method, tmp_path)
    sparsity = sum(int(m.sum()) for m in prune.masks.values()) / sum(m.numel() for m in prune.masks.values())
    assert abs(sparsity - 0.5) < 0.01  # block-wise / layer-wise thresholds: rows vary, the total does not


# --- calibration from cached block inputs (callbacks/cached.py) against full forwards from the embeddings -----------

def _uncached_reference(method, prune, mode="sequential", inputs=None):
    """What the flavour computed before the block-input cache: for each block, a hooked full forward of every clean
    window from the embeddings (through the blocks already pruned), the same pruner, slots and solve; one-shot: every
    layer from the dense model.  `inputs`: [(sample id, ids)] in dispatch order (default: the clean windows).
    Returns (masks, pruned weights)."""
    from callbacks.layers import accumulate, solve_layer
    from callbacks.reduction import SlotSums
    from callbacks.schedule import hooked_forward
    from pipeline.model.calibration import NoisedBatch

    module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
    module.configure_model()
    module.model.eval()
    pruner = prune.pruner
    modules = dict(module.model.named_modules())
    blocks = [(b, [n for n in prune.masks if n.startswith(p + ".")]) for p, b in find_blocks(module.model)]
    passes = blocks if mode == "sequential" else [(blocks[-1][0], [n for _, ns in blocks for n in ns])]
    masks, weights = {}, {}
    for stop, names in passes:
        sums = SlotSums(8)
        for sid, ids in inputs or [(i, w[None]) for i, w in enumerate(_windows())]:
            scores = None
            if pruner.mean_scores:
                total, count = prune.mean_scores.sums[sid]
                scores = (total / count)[None]
            nb = NoisedBatch(ids, ids, torch.zeros_like(ids, dtype=torch.bool), 0.0, 0, [sid], None, sink_scores=scores)
            with torch.no_grad():
                add = lambda n, x, nb=nb: accumulate(pruner, sums, n, x, None, nb, [True])  # noqa: E731
                hooked_forward(module, modules, names, add, ids, None, stop, True)
        with torch.no_grad():
            for n in names:
                masks[n], weights[n], _ = solve_layer(pruner, n, modules[n].weight, sums.total(n), 0.5)
    return masks, weights


def _items():
    return [{"input_ids": w, "index": i, "keep": torch.zeros_like(w, dtype=torch.bool)} for i, w in enumerate(_windows())]


class _PerBlockArguments(PruneCallback):
    """Forces the path for models whose blocks take different arguments: each block's own, captured per batch."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.uniform = False


@pytest.mark.parametrize("method", ["sink_sparsegpt", "wanda"])
def test_cached_block_inputs_are_bit_identical_to_full_forwards(tmp_path, method):
    _, prune, recorder = _run(method, tmp_path)
    assert prune.cached and prune.uniform and len(recorder.batches) == NSAMPLES * TIMESTEPS  # one epoch
    masks, weights = _uncached_reference(method, prune)
    assert set(masks) == set(prune.masks)
    for n in masks:
        assert torch.equal(masks[n], prune.masks[n]), n
        if method == "sink_sparsegpt":
            assert torch.equal(weights[n], prune.pruned_weights[n]), n
    # the per-block-arguments path (models whose blocks are called differently) gives the same bits
    import lightning as L

    module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
    other = _PerBlockArguments(method=method, sparsity=0.5, flavor="reference")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "b"),
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), other])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_items(), batch_size=1))
    assert not other.uniform and all(torch.equal(other.masks[n], prune.masks[n]) for n in masks)


def test_cached_one_shot_is_bit_identical_to_a_dense_forward(tmp_path):
    """A clean-input flavour in one-shot mode: every layer's statistic from the dense model, one pass per block."""
    from pipeline.maths.flavors import FLAVORS
    from pipeline.maths.pruners import ReferenceSinkSparseGPT

    class OneShot(ReferenceSinkSparseGPT):
        mode = "oneshot"

    register(replace(REFERENCE, name="test-one-shot", pruners={**REFERENCE.pruners, "sink_sparsegpt": OneShot}))
    try:
        module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
        prune = PruneCallback(method="sink_sparsegpt", sparsity=0.5, flavor="test-one-shot")
        import lightning as L

        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                            callbacks=[SinkStatsCallback(record=False, heatmap=False), prune])
        loader = torch.utils.data.DataLoader(_items(), batch_size=1)
        trainer.fit(module, train_dataloaders=loader)
    finally:
        del FLAVORS["test-one-shot"]
    assert prune.mode == "oneshot" and prune.cached
    masks, weights = _uncached_reference("sink_sparsegpt", prune, mode="oneshot")
    assert all(torch.equal(masks[n], prune.masks[n]) for n in masks)
    assert all(torch.equal(weights[n], prune.pruned_weights[n]) for n in masks)


def test_reference_flavor_two_processes_equal_one(tmp_path):
    """flavor=reference sink SparseGPT from cached block inputs under DDP (uneven shards): the masks of 1 process."""
    from safetensors.torch import load_file

    from tests.runs import run_cli, tiny_config

    masks = []
    for devices in (1, 2):
        root = tmp_path / f"d{devices}"
        trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
        config = tiny_config(root, method="sink_sparsegpt", nsamples=5, prune_args={"flavor": "reference"},
                             trainer_args=trainer)
        proc = run_cli(config, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        masks.append(load_file(str(root / "pruned" / "masks.safetensors")))
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) == 36
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_reference_flavor_resumes_mid_epoch_to_the_same_masks(tmp_path):
    """The recorded windows and s̄ sums are checkpointed: interrupted after 2 of 3 batches, resumed, the same masks."""
    from safetensors.torch import load_file

    from tests.runs import run_inprocess, tiny_config

    args = {"method": "sink_sparsegpt", "nsamples": 6, "prune_args": {"flavor": "reference"}}
    code, err = run_inprocess(tiny_config(tmp_path / "whole", **args), tmp_path)
    assert code == 0, err[-2000:]
    root = tmp_path / "resumed"
    config = tiny_config(root, **args)
    ckpt = {"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(root / "ckpt")}}
    stop = {"class_path": "tests.test_resume.InterruptAfter", "init_args": {"batches": 2}}
    with_callbacks = lambda *extra: {**config, "trainer": {**config["trainer"],  # noqa: E731
                                                           "callbacks": config["trainer"]["callbacks"] + list(extra)}}
    code, _ = run_inprocess(with_callbacks(ckpt, stop), tmp_path)
    assert code != 0
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=False)
    prune_state = next(v for k, v in state["callbacks"].items() if "PruneCallback" in k)
    assert len(prune_state["recorded"]["batches"]) == 2 and len(prune_state["mean_scores"]) == 4  # 2 batches of 2
    code, err = run_inprocess(with_callbacks(ckpt), tmp_path, "--ckpt_path", str(root / "ckpt" / "last.ckpt"))
    assert code == 0, err[-2000:]
    whole, resumed = (load_file(str(r / "pruned" / "masks.safetensors")) for r in (tmp_path / "whole", root))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_cached_noised_inputs_with_mean_scores_are_bit_identical(tmp_path):
    """A pruner with s̄ on noised inputs (the ablation's row 4): every (window, timestep) recorded, then block by block
    from cached inputs, the same bits as full forwards of those x_t."""
    from pipeline.maths.flavors import FLAVORS
    from pipeline.maths.pruners import ReferenceSinkSparseGPT

    class Noised(ReferenceSinkSparseGPT):
        inputs = "noised"

    register(replace(REFERENCE, name="test-noised", pruners={**REFERENCE.pruners, "sink_sparsegpt": Noised}))
    try:
        import lightning as L

        module = DLMModule(pretrained="tiny-llada", timesteps=TIMESTEPS, seed=0)
        prune, recorder = PruneCallback(method="sink_sparsegpt", sparsity=0.5, flavor="test-noised"), Recorder()
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                            callbacks=[SinkStatsCallback(record=False, heatmap=False), prune, recorder])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(_items(), batch_size=1))
    finally:
        del FLAVORS["test-noised"]
    assert prune.cached and len(prune.recorded.batches) == NSAMPLES * TIMESTEPS
    noised = [(sids[0], ids) for sids, ids, _, _ in recorder.batches]
    masks, weights = _uncached_reference("sink_sparsegpt", prune, inputs=noised)
    assert all(torch.equal(masks[n], prune.masks[n]) for n in masks)
    assert all(torch.equal(weights[n], prune.pruned_weights[n]) for n in masks)


def test_running_mean_slots_weight_each_slot_by_its_windows():
    """SlotSums.running: one slot is the running mean itself, bit for bit; several are Σ n_g·mean_g / Σ n_g (folded
    slot by slot or not, and after a checkpoint round trip)."""
    from callbacks.reduction import SlotSums
    from pipeline.maths.reference import add_running_hessian_

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 4, generator=g) for _ in range(7)]
    one = SlotSums(1)
    for sid, x in enumerate(xs):
        add_running_hessian_(*one.running("h", sid, (4, 4)), x)
    expected = _running_hessian32([x for x in xs], [torch.zeros(5)] * len(xs))
    assert torch.equal(one.take("h").float(), expected)

    def filled(folding: bool):
        sums = SlotSums(3)
        for slot in range(3):  # slot by slot, as calibrate_from_cache goes
            for sid in range(slot, len(xs), 3):
                add_running_hessian_(*sums.running("h", sid, (4, 4)), xs[sid])
            if folding:
                sums.fold(["h"], slot + 1)
        restored = SlotSums(3)
        restored.load_state_dict(sums.state_dict())
        return restored

    means = [_running_hessian32(xs[s::3], [torch.zeros(5)] * len(xs[s::3])).double() for s in range(3)]
    weighted = (means[0] * 3 + means[1] * 2 + means[2] * 2) / 7
    plain, folded = filled(False).take("h"), filled(True).take("h")
    assert torch.equal(plain, folded) and torch.allclose(plain, weighted, rtol=0, atol=1e-12)
