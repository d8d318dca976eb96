"""Issue 15: recipe names for --config, the short flags, fast help, paired differences, a quiet console."""
import math
import subprocess
import sys
import time

import pytest

import cli
from pipeline.maths.metrics import paired_difference, paired_items, within_noise
from tests.runs import REPO, run_cli, tiny_config


def test_config_name_finds_packaged_recipe():
    for value in ("tiny_sink50", "tiny_sink50.yaml", "configs/tiny_sink50.yaml", "llada_sink50.yaml"):
        assert cli.find_config(value).is_file()
    assert cli.find_config("llada_sink50.yaml") == cli.CONFIG_DIR / "llada_sink50.yaml"
    args = cli.check_config_files(["fit", "--config", "tiny_sink50"])
    assert args == ["fit", "--config", str(cli.CONFIG_DIR / "tiny_sink50.yaml")]


def test_unknown_config_lists_recipes_in_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, "cli.py", "fit", "--config", "no_such_recipe"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config no_such_recipe")
    assert "tiny_sink50" in lines[0] and "llada_sink50" in lines[0]


def test_short_flags_rewrite():
    args, flags = cli.short_flags(["fit", "--config", "x", "--method", "wanda", "--sparsity=60%", "--model", "tiny-llada",
                                   "--data", "wikitext2", "--output", "runs/o", "--trainer.devices", "1"])
    assert args == ["fit", "--config", "x", "--model.init_args.pretrained", "tiny-llada", "--data.init_args.dataset",
                    "wikitext2", "--trainer.default_root_dir", "runs/o", "--trainer.devices", "1"]
    assert flags == {"method": "wanda", "sparsity": 0.6}
    assert cli.short_flags(["--n-m", "2:4"])[1] == {"n_m": "2:4"}
    assert cli.short_flags(["--model", "configs/model/minilm_dlm.yaml"])[0] == ["--model", "configs/model/minilm_dlm.yaml"]
    with pytest.raises(ValueError, match="N:M"):
        cli.short_flags(["--n-m", "50%"])


def test_method_flags_reach_prune_callback():
    from jsonargparse import Namespace

    from pipeline.run.lightning_cli import PRUNE, SINK_STATS, apply_method_flags

    config = {"trainer": {"callbacks": [Namespace(class_path=PRUNE, init_args=Namespace(method="wanda", sparsity=0.5, n_m=None))]}}
    apply_method_flags(config, {"method": "sink_wanda", "n_m": "2:4"})
    sink, prune = config["trainer"]["callbacks"]
    assert sink.class_path == SINK_STATS  # a sink method needs the statistics callback before PruneCallback
    assert (prune.init_args.method, prune.init_args.n_m, prune.init_args.sparsity) == ("sink_wanda", "2:4", None)
    with pytest.raises(ValueError, match="choose one of"):
        apply_method_flags(config, {"method": "nope"})


def test_help_is_fast_and_explains_the_tool():
    for argv in (["--help"], ["fit", "--help"], []):
        start = time.time()
        done = subprocess.run([sys.executable, "cli.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and time.time() - start < 5
        for word in ("sink_wanda", "--sparsity", "--n-m", "--method", "--model", "--data", "--output", "tiny_sink50"):
            assert word in done.stdout
    assert "torch" not in subprocess.run([sys.executable, "-c", "import cli, sys; print(sorted(sys.modules))"], cwd=REPO,
                                         capture_output=True, text=True).stdout.split("'torch'")[0][-1:]


def test_paired_difference_matches_hand_computation():
    dense = {0: (10.0, 5.0), 1: (20.0, 10.0), 2: (6.0, 5.0), 7: (1.0, 1.0)}  # 7: pruned did not score it
    pruned = {0: (11.0, 5.0), 1: (23.0, 10.0), 2: (6.5, 5.0)}
    out = paired_difference(dense, pruned)
    # by hand: δ = (1, 3, 0.5), T = (5, 10, 5), Δ = 4.5 / 20 = 0.225
    # residuals δ − TΔ = (1 − 1.125, 3 − 2.25, 0.5 − 1.125) = (−0.125, 0.75, −0.625)
    # s.e. = sqrt(3/2 · (0.015625 + 0.5625 + 0.390625)) / 20 = sqrt(1.453125) / 20
    assert out["windows"] == 3 and out["tokens"] == 20
    assert out["delta_nll"] == pytest.approx(0.225)
    assert out["stderr"] == pytest.approx(math.sqrt(1.453125) / 20)
    # equal token counts: the s.e. of the mean per-token difference
    equal = paired_difference({i: (0.0, 4.0) for i in range(4)}, {i: (4.0 * d, 4.0) for i, d in enumerate((0.1, 0.3, 0.2, 0.6))})
    diffs = [0.1, 0.3, 0.2, 0.6]
    mean = sum(diffs) / 4
    assert equal["stderr"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4))


def test_paired_items_and_noise():
    dense = {"a": 1, "b": 0, "c": 1, "d": 1}
    pruned = {"a": 1, "b": 1, "c": 0, "d": 0}
    out = paired_items(dense, pruned)  # diffs 0, 1, −1, −1: mean −0.25, sd sqrt(0.9167)
    assert out["delta"] == pytest.approx(-0.25) and out["changed"] == 3
    assert out["stderr"] == pytest.approx(math.sqrt((0.0625 + 1.5625 + 0.5625 + 0.5625) / 3 / 4))
    assert within_noise(out["delta"], out["stderr"])
    assert not within_noise(0.2, 0.01) and within_noise(0.0, 0.0)


NOISE = ("No seed found", "Seed set to", "litlogger", "configure_optimizers", "LeafSpec", "modules in eval mode",
         "pooler", "Custom kwargs", "Overwriting default num_fewshot", "CUDA is not available", "GPU available")


def test_tiny_run_console_is_quiet(tmp_path):
    config = tiny_config(tmp_path, nsamples=2, seqlen=32, timesteps=2, prune_args={
        "tasks": [{"name": "wiki_cloze_offline", "num_fewshot": 0, "mc_num": 1, "limit": 4}], "save_model": False})
    done = run_cli(config, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    for text in NOISE:
        assert text not in console, text
    assert "where the time went" in console and "paired" in console
    assert (tmp_path / "run.log").is_file()
    import json

    results = json.loads((tmp_path / "pruned" / "results.json").read_text())
    assert "calibration + pruning" in results["phase_timings"]
    assert {"delta_nll", "stderr", "windows"} <= set(results["paired"]["heldout"])
    assert "layer" in results["sparsity_report"]["layers"][0] and "." in results["sparsity_report"]["layers"][0]["layer"]


def test_eval_help_mentions_dlm_and_offline_tasks():
    done = subprocess.run([sys.executable, "-m", "pipeline.evaluation.harness", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert "--model dlm" in done.stdout and "wiki_cloze_offline" in done.stdout and "mmlu_dev_offline" in done.stdout


def test_dense_cache_gives_the_same_numbers(tmp_path, monkeypatch):
    import json

    results = []
    for run in ("first", "second"):
        root = tmp_path / run
        config = tiny_config(root, nsamples=2, seqlen=32, timesteps=2, prune_args={"save_model": False, "cache_dense": True})
        monkeypatch.setenv("SINKPRUNE_DENSE_CACHE_DIR", str(tmp_path / "cache"))
        done = run_cli(config, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(json.loads((root / "pruned" / "results.json").read_text()))
    first, second = results
    assert "dense_cached" not in first["timings"] and second["timings"]["dense_cached"] is True
    assert first["dense"] == second["dense"] and first["paired"] == second["paired"]
