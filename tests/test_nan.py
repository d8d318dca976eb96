"""NaN/Inf during calibration is caught and named: a real `cli.py fit` on the embedded model, with one module's
input (or one weight) poisoned from the calibration epoch on, fails with one error line that names the layer,
exit code 2, and no output directory."""
import re

import pytest

from tests.runs import run_inprocess, tiny_config


def _run(tmp_path, method, fault):
    root = tmp_path / "run"
    config = tiny_config(root, method=method, nsamples=2, seqlen=32, timesteps=2, model_args={"score_dense": False})
    config["trainer"]["callbacks"].insert(0, fault)
    code, err = run_inprocess(config, tmp_path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-3000:]
    assert not (root / "pruned").exists() and not (root / "sinks").exists()
    return errors[0]


def _named_layer(error: str) -> str:
    found = re.search(r"NaN/Inf in the input activations of ([\w.]+)", error)
    assert found, error
    return found.group(1)


@pytest.mark.parametrize("method,layer,value", [
    ("wanda", "bert.encoder.layer.2.intermediate.dense", float("nan")),
    ("sparsegpt", "bert.encoder.layer.4.attention.output.dense", float("inf")),
])
def test_poisoned_layer_input_is_named(tmp_path, method, layer, value):
    error = _run(tmp_path, method, {"class_path": "tests.faults.PoisonInput", "init_args": {"module": layer, "value": value}})
    assert _named_layer(error) == layer  # the first layer whose input is bad, not a later one


def test_nan_weight_names_the_first_layer_it_reaches(tmp_path):
    """A NaN in layer 1's post-attention LayerNorm reaches layer 1's intermediate.dense first."""
    fault = {"class_path": "tests.faults.PoisonWeight",
             "init_args": {"param": "bert.encoder.layer.1.attention.output.LayerNorm.weight"}}
    error = _run(tmp_path, "wanda", fault)
    assert _named_layer(error) == "bert.encoder.layer.1.intermediate.dense"


def test_nan_attention_mass_is_named(tmp_path):
    """With a sink-aware method the probed forward sees it first: the attention mass, and where it turns NaN."""
    module = "bert.encoder.layer.3.attention.self"
    error = _run(tmp_path, "sink_wanda", {"class_path": "tests.faults.PoisonInput", "init_args": {"module": module}})
    assert "attention mass has NaN/Inf at timestep" in error
    assert f"first in attention call 3 of 6 ({module})" in error


def test_probe_keeps_nan_but_zeroes_fully_masked_rows():
    """NaN/Inf in q or k gives NaN mass (a blanket nan_to_num once made it a silent 0); a row whose every key
    is masked (bool or -inf additive mask) still gives 0, as SDPA's math kernel does."""
    import torch
    import torch.nn.functional as F

    from pipeline.maths.attention import AttentionMassProbe

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[1, :, 2, :] = False  # query 2 of sample 1 sees no key
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        with AttentionMassProbe() as probe:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.isfinite(probe.mass).all()
        torch.testing.assert_close(probe.mass.sum(dim=1), torch.tensor([3.0 * 5, 3.0 * 4]))  # 3 heads x live queries
    for bad in (float("nan"), float("inf")):
        for poisoned in ("query", "key"):
            qq, kk = q.clone(), k.clone()
            (qq if poisoned == "query" else kk)[0, 1, 3, 2] = bad
            with AttentionMassProbe() as probe:
                F.scaled_dot_product_attention(qq, kk, v, attn_mask=keep)
            assert not torch.isfinite(probe.mass[0]).all(), (bad, poisoned)
            assert torch.isfinite(probe.mass[1]).all(), (bad, poisoned)  # the other sample is untouched
