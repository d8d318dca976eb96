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

    from lightning_cli import PRUNE, SINK_STATS, apply_method_flags

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
    # the calibration bar names its phase and counts noised windows (2 windows x 2 timesteps), not "Epoch 0"
    assert "Epoch 0" not in console
    assert "calibration" in console and "4/4 windows × timesteps" in console
    assert "saving" in console and "pruned: wiki_cloze_offline" in console
    # the time spent saving is in results.json (written inside the atomic folder) and in the closing table
    assert results["timings"]["save_s"] > 0 and results["phase_timings"]["saving"] == results["timings"]["save_s"]
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


def test_sequential_calibration_bar_names_each_block(tmp_path):
    config = tiny_config(tmp_path, method="sink_sparsegpt", nsamples=2, seqlen=32, timesteps=2,
                         prune_args={"mode": "sequential", "save_model": False, "score": False, "score_dense": False})
    done = run_cli(config, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    console = done.stdout + done.stderr
    for block in range(1, 7):  # minilm-dlm has 6 blocks: one calibration epoch each
        assert f"calibration block {block}/6" in console, block
    assert "Epoch" not in console


def test_import_cli_loads_no_heavy_library():
    """`sinkprune --help` stays fast: importing cli pulls in none of the libraries a run needs."""
    heavy = ("torch", "lightning", "transformers", "lm_eval", "datasets", "matplotlib", "rich", "gensim", "pipeline.evaluation")
    done = subprocess.run([sys.executable, "-c", "import cli, sys; print(' '.join(sorted(sys.modules)))"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    loaded = set(done.stdout.split())
    assert done.returncode == 0 and "cli" in loaded
    assert not [m for m in loaded if m.split(".")[0] in heavy or m.startswith(heavy)], sorted(loaded)


def test_head_only_where_read_gives_the_full_forwards_logits(minilm):
    import torch

    from pipeline.model.head import logits_at, suffix_logits

    model, tokenizer = minilm
    ids = torch.randint(1000, 20000, (2, 40), generator=torch.Generator().manual_seed(0))
    where = torch.zeros(2, 40, dtype=torch.bool)
    where[0, [3, 17]] = where[1, 39] = True  # 3 chosen: padded to the head's minimum rows, bits unchanged
    ids[where] = tokenizer.mask_token_id
    with torch.no_grad():
        full = model(input_ids=ids).logits
        at = logits_at(model, lambda: model(input_ids=ids).logits, where)
        tail = suffix_logits(model, lambda: model(input_ids=ids).logits, 3)
    assert at.shape == full.shape and torch.equal(at[where], full[where])
    assert tail.shape == (2, 3, full.shape[-1]) and torch.allclose(tail, full[:, -3:], atol=1e-4)


def test_repeated_noised_rows_run_once_with_the_same_estimate(minilm):
    import torch

    from pipeline.evaluation.likelihood import TargetLogits, greedy_match, mc_loglikelihood

    model, tokenizer = minilm
    mask = tokenizer.mask_token_id
    prompt = torch.tensor([101, *range(2000, 2030)])
    cache = TargetLogits(model, mask)
    choices = [torch.tensor([t]) for t in (2100, 2200, 2300, 2400)]  # one-token choices of one question
    cached = [mc_loglikelihood(model, prompt, c, mask, mc_num=4, batch_size=4, cache=cache,
                               generator=torch.Generator().manual_seed(1)) for c in choices]
    assert cache.rows_run == 1  # every draw of every choice is `prompt [MASK]`
    greedy_match(model, prompt, choices[0], mask, cache=cache)
    assert cache.rows_run == 1  # the greedy check's all-masked row too
    with torch.no_grad():  # by hand: the log-probability of each choice at the masked position
        logp = model(input_ids=torch.tensor([[*prompt.tolist(), mask]])).logits[0, -1].float().log_softmax(-1)
    assert cached == pytest.approx([float(logp[c]) for c in choices], abs=1e-4)
    two = torch.tensor([2100, 2200])  # two tokens, 4 stratified draws: k = 1, 1, 2, 2 -> at most 3 distinct rows
    fresh = TargetLogits(model, mask)
    value = mc_loglikelihood(model, prompt, two, mask, mc_num=4, batch_size=1, cache=fresh,
                             generator=torch.Generator().manual_seed(1))
    assert fresh.rows_run <= 3
    assert value == pytest.approx(mc_loglikelihood(model, prompt, two, mask, mc_num=4, batch_size=4,
                                                   generator=torch.Generator().manual_seed(1)), abs=1e-4)


def test_ddp_paired_difference_pairs_every_ranks_windows(tmp_path):
    """Each rank scores its own held-out windows; the paired dense/pruned difference gathers all of them."""
    import json

    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"w{devices}"
        trainer = {"devices": devices, **({"strategy": "calibration_ddp_spawn"} if devices > 1 else {})}
        config = tiny_config(root, nsamples=2, seqlen=32, timesteps=2, prune_args={"save_model": False},
                             trainer_args=trainer)
        done = run_cli(config, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[devices] = json.loads((root / "pruned" / "results.json").read_text())
    one, two = runs[1]["paired"]["heldout"], runs[2]["paired"]["heldout"]
    assert runs[2]["run"]["world_size"] == 2
    assert one["windows"] == two["windows"] == 4  # tiny_config holds out 4 windows: 2 per rank under DDP
    assert two["delta_nll"] == pytest.approx(one["delta_nll"], abs=1e-9)
    assert two["stderr"] == pytest.approx(one["stderr"], abs=1e-9)
