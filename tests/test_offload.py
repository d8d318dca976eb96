"""DLMModule(offload=...): blocks onloaded one at a time give the resident run's masks and pruned weights bit for bit
(every method, both flavours, N:M, MoE), the memory plan picks offload under a device budget, and the weights counted
on the compute device never exceed two blocks plus the embeddings and head."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.runs import REPO, run_cli, run_inprocess, tiny_config


def _fit(tmp_path, name, offload, pretrained="tiny-llada", method="sink_wanda", prune_args=None, model_args=None,
         trainer_args=None, **kwargs):
    root = tmp_path / name
    config = tiny_config(root, method=method, pretrained=pretrained, nsamples=4, seqlen=32, timesteps=2,
                         prune_args={"score": False, **(prune_args or {})},
                         model_args={"offload": offload, "score_dense": False, **(model_args or {})},
                         trainer_args=trainer_args, **kwargs)
    if trainer_args and trainer_args.get("devices", 1) > 1:
        proc = run_cli(config, tmp_path)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-3000:]
    out = root / "pruned"
    return (load_file(str(out / "masks.safetensors")), load_file(str(out / "model" / "model.safetensors")),
            json.loads((out / "results.json").read_text()))


def _same(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


CASES = {
    "llada-sink_wanda": dict(pretrained="tiny-llada", method="sink_wanda"),
    "moe-sink_sparsegpt": dict(pretrained="tiny-llada-moe", method="sink_sparsegpt"),
    "llada-sink_wanda-2of4": dict(pretrained="tiny-llada", method="sink_wanda", n_m="2:4"),
    "llada-reference-sink_sparsegpt": dict(pretrained="tiny-llada", method="sink_sparsegpt",
                                           prune_args={"flavor": "reference"}, model_args={"noise_order": "reference"}),
    "moe-wanda-sequential": dict(pretrained="tiny-llada-moe", method="wanda", prune_args={"mode": "sequential"}),
    "llada-sink_wanda-sequential": dict(pretrained="tiny-llada", method="sink_wanda", prune_args={"mode": "sequential"}),
    "llada-magnitude": dict(pretrained="tiny-llada", method="magnitude"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_offload_equals_resident(tmp_path, case):
    kwargs = CASES[case]
    masks, weights, results = _fit(tmp_path, "none", "none", **kwargs)
    assert results["memory"]["offload"] == "none"
    for offload in ("cpu", "disk") if case in ("llada-sink_wanda", "moe-sink_sparsegpt") else ("cpu",):
        m, w, r = _fit(tmp_path, offload, offload, **kwargs)
        _same(masks, m)
        _same(weights, w)
        assert r["memory"]["offload"] == offload and r["memory"]["offloader"]["onloads"] > 0
        assert r["sparsity_report"] == results["sparsity_report"]
        if kwargs["method"].startswith("sink_"):  # the sink records come from the block-by-block mass pass
            assert (tmp_path / offload / "sinks" / "sinks.json").read_text() == (tmp_path / "none" / "sinks" / "sinks.json").read_text()


def test_budget_makes_auto_offload_and_bounds_device_weights(tmp_path, monkeypatch):
    _, _, resident = _fit(tmp_path, "auto-free", "auto")
    assert resident["memory"]["offload"] == "none"
    monkeypatch.setenv("SINKPRUNE_DEVICE_BUDGET", "12.5MiB")  # resident needs 13.3 MiB, offloaded 9.9
    masks, _, results = _fit(tmp_path, "auto-budget", "auto")
    memory = results["memory"]
    assert memory["offload"] == "cpu" and memory["device_free_bytes"] == int(12.5 * 2**20)
    assert memory["resident_device_peak_bytes"] > 0.9 * 12.5 * 2**20 >= memory["offload_device_peak_bytes"] and memory["fits"]
    counted = memory["offloader"]
    blocks, block, rest = counted["blocks"], counted["block_bytes"], counted["resident_bytes"]
    assert blocks == 4 and counted["peak_weight_bytes_on_device"] <= rest + 2 * block
    assert counted["peak_weight_bytes_on_device"] >= rest + block  # a block was on the device while it ran
    assert rest + 2 * block < memory["model_bytes"]  # (the bound says something: the whole model is more)
    _same(masks, load_file(str(tmp_path / "auto-free" / "pruned" / "masks.safetensors")))


def test_two_processes_with_offload_equal_one_resident(tmp_path):
    masks, weights, _ = _fit(tmp_path, "one", "none")
    m, w, r = _fit(tmp_path, "two", "cpu", trainer_args={"devices": 2, "strategy": "calibration_ddp_spawn"})
    _same(masks, m)
    _same(weights, w)
    assert r["run"]["world_size"] == 2 and r["memory"]["offload"] == "cpu"


def test_out_of_memory_is_one_line_with_plan_fix_and_checkpoint(tmp_path):
    root = tmp_path / "oom"
    config = tiny_config(root, method="sink_wanda", pretrained="tiny-llada", nsamples=4, seqlen=32, timesteps=2,
                         prune_args={"score": False}, model_args={"offload": "cpu", "score_dense": False})
    checkpoint = {"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(tmp_path / "ckpt")}}
    fault = {"class_path": "tests.faults.OutOfMemoryInBlock", "init_args": {"block": 1}}
    config["trainer"]["callbacks"] = [*config["trainer"]["callbacks"], checkpoint, fault]
    before = {p.name: p.stat().st_mtime_ns for p in (REPO / "pipeline" / "zoo" / "tiny_llada").iterdir()}
    proc = run_cli(config, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    line = lines[0]
    assert "CUDA out of memory while measuring attention mass block by block" in line
    assert "plan offload=cpu" in line and "measured peak" in line and "fix:" in line
    assert f"--ckpt_path {tmp_path / 'ckpt' / 'last.ckpt'}" in line
    assert not (root / "pruned").exists()  # nothing half-written
    assert before == {p.name: p.stat().st_mtime_ns for p in (REPO / "pipeline" / "zoo" / "tiny_llada").iterdir()}
    # the checkpoint resumes: the same masks as a run that never failed
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:-1]
    proc = run_cli(config, tmp_path, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    masks, _, _ = _fit(tmp_path, "clean", "none")
    _same(masks, load_file(str(root / "pruned" / "masks.safetensors")))


def _plan(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "cli.py", "plan", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_plan_from_config_alone():
    one = _plan("--model", "configs/plans/llada2_0_flash", "--devices", "1", "--json")
    eight = _plan("--model", "configs/plans/llada2_0_flash/config.json", "--devices", "8", "--json")
    assert one.returncode == 0 and eight.returncode == 0, one.stderr + eight.stderr
    p1, p8 = json.loads(one.stdout), json.loads(eight.stdout)
    assert 98e9 < p1["model_bytes"] / 2 < 106e9  # about 103B parameters in bf16 (100B-A6B)
    assert p1["offload"] == p8["offload"] == "cpu" and p1["fits"] and p8["fits"]
    assert p1["predicted_device_peak_bytes"] < 80e9 * 0.9 < p1["resident_device_peak_bytes"]
    assert p8["block_input_cache_bytes"] * 8 == p1["block_input_cache_bytes"]  # the windows are sharded
    sgpt = _plan("--model", "configs/plans/llada2_0_flash", "--method", "sink_sparsegpt")
    assert sgpt.returncode == 1 and "DOES NOT FIT" in sgpt.stdout and "Hessians" in sgpt.stdout
    for bad in (["--model", "no/such-model"], ["--model", "./missing/config.json"], ["--model", "configs/plans/llada2_0_flash",
                                                                                       "--devices", "0"]):
        proc = _plan(*bad)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: plan --"), proc.stderr


@pytest.mark.parametrize("offload,budget,expected", [("gpu", None, "model.offload='gpu': use one of auto, none, cpu, disk"),
                                                     ("auto", "lots", "SINKPRUNE_DEVICE_BUDGET=lots: 'lots' is not a size")])
def test_bad_offload_inputs_are_one_line(tmp_path, monkeypatch, offload, budget, expected):
    if budget:
        monkeypatch.setenv("SINKPRUNE_DEVICE_BUDGET", budget)
    config = tiny_config(tmp_path / "bad", pretrained="tiny-llada", model_args={"offload": offload})
    code, err = run_inprocess(config, tmp_path)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err[-2000:]
    assert not (tmp_path / "bad").exists()
