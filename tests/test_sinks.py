"""Sink scores, mass statistics, sink-position variance, token kinds, the causal baseline and heatmaps."""
import math

import pytest
import torch

from pipeline.evaluation.sink_tables import plot_heatmap
from pipeline.maths.sinks import (
    causal_baseline_share,
    mass_statistics,
    sink_position_variance,
    sink_scores,
    token_kind,
)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_single_spike_is_a_sink_and_the_rest_are_not():
    # T = 10, one spike of 10: mean 1, population std = 10·sqrt(9)/10 = 3, threshold 1 + 2·3 = 7
    mass = torch.zeros(1, 10)
    mass[0, 4] = 10.0
    s = sink_scores(mass, k=2.0, alpha=5.0)
    assert s[0, 4].item() == pytest.approx(sigmoid(5 * (10 - 7)), abs=1e-7)  # sigmoid(15) ≈ 0.9999997
    assert s[0, 0].item() == pytest.approx(sigmoid(5 * (0 - 7)), abs=1e-12)  # sigmoid(-35) ≈ 6e-16
    # sample std: sqrt(Σ dev² / 9) = sqrt(90 / 9) = sqrt(10)
    su = sink_scores(mass, unbiased=True)
    assert su[0, 4].item() == pytest.approx(sigmoid(5 * (10 - 1 - 2 * math.sqrt(10))), rel=1e-6)


def test_flat_and_two_level_mass():
    assert torch.allclose(sink_scores(torch.full((2, 7), 3.0)), torch.full((2, 7), 0.5))  # std 0: sigmoid(0)
    # [1, 3, 1, 3]: mean 2, population std 1, threshold 4
    s = sink_scores(torch.tensor([[1.0, 3.0, 1.0, 3.0]]))
    torch.testing.assert_close(s, torch.tensor([[sigmoid(-15), sigmoid(-5), sigmoid(-15), sigmoid(-5)]]))


def test_valid_mask_ignores_padding():
    mass = torch.tensor([[1.0, 3.0, 1.0, 3.0, 100.0, 100.0]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    s = sink_scores(mass, valid=valid)
    torch.testing.assert_close(s[:, :4], sink_scores(mass[:, :4]))
    assert s[0, 4:].abs().max() == 0


def test_mass_statistics():
    mass = torch.tensor([[6.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 9.0, 50.0, 0.0]])
    stats = mass_statistics(mass, valid=torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]]))
    assert stats["dominant_position"].tolist() == [0, 0, 1]
    torch.testing.assert_close(stats["top1_share"], torch.tensor([0.6, 0.25, 0.9]))
    p = torch.tensor([0.6, 0.2, 0.1, 0.1])
    expected_h0 = float(-(p * p.log()).sum() / math.log(4))
    h1 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9)) / math.log(2)
    torch.testing.assert_close(stats["normalized_entropy"], torch.tensor([expected_h0, 1.0, h1]))
    torch.testing.assert_close(stats["uniform_share"], torch.tensor([0.25, 0.25, 0.5]))


def test_sink_position_variance():
    assert sink_position_variance([[0, 0, 0], [3, 3]]) == 0.0
    assert sink_position_variance([[0, 10, 0, 10]]) == 25.0  # population variance
    assert sink_position_variance(torch.tensor([[0, 10], [2, 2]])) == 12.5  # mean of (25, 0)
    assert sink_position_variance([[1, 2, 3]], per_sample=True) == [pytest.approx(2 / 3)]


def test_causal_baseline_share():
    assert causal_baseline_share(1) == 1.0
    assert causal_baseline_share(4) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    with pytest.raises(ValueError):
        causal_baseline_share(0)


def test_token_kinds(minilm):
    _, tok = minilm
    ids = tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[MASK]", "[PAD]", ",", "house", "##s"])
    kinds = [token_kind(i, tok, tok.mask_token_id) for i in ids]
    assert kinds == ["bos/cls", "eos/sep", "mask", "pad", "punctuation", "word", "word"]
    assert token_kind(7, None, 7) == "mask" and token_kind(8, None, 7) == "token"


def test_heatmap_png_written(tmp_path):  # atomic as part of its caller's AtomicDir
    matrix = torch.rand(5, 12)
    matrix[4, 10:] = float("nan")  # AR rows shorter than the last one
    path = plot_heatmap(matrix, tmp_path / "sub" / "heat.png", title="test", ylabels=[f"t={i}" for i in range(5)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["heat.png"]


def test_ar_trajectory_measures_only_the_newest_query():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.evaluation.sink_report import ar_generation_trajectory

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    windows = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    trajectory, shape = ar_generation_trajectory(model, SimpleNamespace(bos_token_id=1), windows, steps=3)
    assert shape == {"prompt_tokens": 1 + 3, "generated": 3}  # BOS + a quarter of 12
    for i, (_, mass, tokens) in enumerate(trajectory):
        assert mass.shape == tokens.shape == (2, 4 + i)
        torch.testing.assert_close(mass.sum(dim=1), torch.full((2,), 2.0 * 4))  # layers x heads x 1 query


def test_command_writes_report_and_refuses_an_existing_folder(tmp_path, capsys):
    import json

    from pipeline.evaluation.sink_report import main

    out = tmp_path / "sinks"
    args = ["--samples", "2", "--seqlen", "16", "--steps", "3", "--ar", "none", "--out", str(out)]
    report = main(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sinks"]  # no temp folder left behind
    assert sorted(p.name for p in out.iterdir()) == [".sinkprune-output", "dlm_heatmap.png", "sinks.json", "table.md"]
    assert "| dominant sink position variance |" in (out / "table.md").read_text()
    saved = json.loads((out / "sinks.json").read_text())
    assert saved["ar"] is None and "disabled" in saved["ar_skipped"]
    assert len(saved["dlm"]["steps"]) == 3 and saved["dlm"]["sink_position_variance"] == report["dlm"]["sink_position_variance"]
    assert "denoising" in saved["dlm"]["mode"]
    with pytest.raises(SystemExit):
        main(args)
    assert "already exists" in capsys.readouterr().out
