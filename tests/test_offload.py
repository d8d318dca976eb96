"""DLMModule(offload=...): blocks onloaded one at a time give the resident run's masks and pruned weights bit for bit
(every method, both flavours, N:M, MoE), the memory plan picks offload under a device budget, and the weights counted
on the compute device never exceed two blocks plus the embeddings and head."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from callbacks.reduction import SlotSums
from pipeline.model import memory_plan as mp
from tests.live_bytes import LiveBytes
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
                                           prune_args={"flavor": "reference-exact"}),
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
    monkeypatch.setenv("SINKPRUNE_DEVICE_BUDGET", "12.5MiB")  # resident needs 13.4 MiB, offloaded 9.1
    masks, _, results = _fit(tmp_path, "auto-budget", "auto")
    memory = results["memory"]
    assert memory["offload"] == "cpu" and memory["device_free_bytes"] == int(12.5 * 2**20)
    assert memory["resident_device_peak_bytes"] > 0.9 * 12.5 * 2**20 >= memory["offload_device_peak_bytes"] and memory["fits"]
    counted = memory["offloader"]
    blocks, block, rest = counted["blocks"], counted["block_bytes"], counted["resident_bytes"]
    assert blocks == 4 and counted["peak_weight_bytes_on_device"] <= rest + 2 * block
    assert counted["peak_weight_bytes_on_device"] >= rest + block  # a block was on the device while it ran
    assert rest + 2 * block < memory["model_bytes"]  # (the bound says something: the whole model is more)
    # the block passes: the output head never on the device, the embeddings only while the block inputs are made
    head, buffers = counted["head_bytes"], counted["buffer_bytes"]
    assert head > 0 and counted["peak_outer_bytes_in_passes"] == rest - buffers - head
    assert block < counted["peak_weight_bytes_in_passes"] <= buffers + max(rest - buffers - head, 2 * block)
    # the plan's phases: the short full forwards at fit start hold the most weights, as counted
    phases = memory["offload_phases"]
    assert phases["full forward"] == rest + 2 * block >= counted["peak_weight_bytes_on_device"]
    assert memory["offload_device_peak_bytes"] == max(phases.values()) and memory["block_inputs_on"] == "device"
    _same(masks, load_file(str(tmp_path / "auto-free" / "pruned" / "masks.safetensors")))


def test_sparsegpt_hessians_of_one_block_at_a_time(tmp_path, monkeypatch):
    """Offloaded SparseGPT: only the Hessians of the block being calibrated exist (one float32 slot per statistic, the
    completed slots folded into float64 totals), solved and freed before the next block; the plan's figure bounds
    the float32 slots (the device's share)."""
    seen = []  # at every slot creation: (blocks with statistics, most float32 slots of one key, their bytes)
    accumulator = SlotSums.accumulator

    def watching(sums, key, sample_id, *args, **kwargs):
        out = accumulator(sums, key, sample_id, *args, **kwargs)
        slots = [t for per_key in sums.sums.values() for t in per_key.values()]
        blocks = {re.search(r"\.blocks\.(\d+)\.", k).group(1) for k in (*sums.sums, *sums.folded)}
        seen.append((blocks, max(len(v) for v in sums.sums.values()), sum(t.numel() * t.element_size() for t in slots)))
        return out

    monkeypatch.setattr(SlotSums, "accumulator", watching)
    _, _, results = _fit(tmp_path, "sgpt", "cpu", method="sink_sparsegpt", batch_size=1)
    assert [b for b, _, _ in seen if len(b) != 1] == []  # never two blocks' statistics at once
    assert sorted({b.pop() for b, _, _ in seen}) == ["0", "1", "2", "3"]
    assert max(n for _, n, _ in seen) == 1  # one slot per statistic: the others are folded
    assert 0 < max(size for *_, size in seen) <= results["memory"]["statistic_device_bytes"]


LLADA_8B = {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "embedding_size": 126464, "weight_tying": False, "torch_dtype": "bfloat16"}


def test_plan_states_the_hessian_and_solver_bytes():
    shape = mp.shape_from_config(LLADA_8B, "llada-8b")
    cal = mp.Calibration(statistic="hessian", windows=4, timesteps=10, seqlen=2048)
    plan = mp.memory_plan(shape, cal, device_free=141 * 10**9, devices=1, offload="cpu")
    entries = 3 * 4096**2 + 12288**2  # q/k/v share a Hessian, gate/up too; o; the down projection's is 12288²
    assert plan["statistic_device_bytes"] == 4 * entries and plan["statistic_cpu_bytes"] == 8 * entries
    assert plan["solver_bytes"] == 38 * 12288**2 + 22 * 4096 * 12288  # the down projection, the largest to solve
    phases = plan["offload_phases"]
    assert plan["offload_device_peak_bytes"] == phases["solve"] == 2 * shape.block_bytes + plan["solver_bytes"] + (
        plan["block_input_cache_bytes"])  # (the block inputs fit beside it)
    assert phases["block inputs"] < phases["full forward"] - shape.head_bytes  # no head, no block while they are made
    table = " ".join(mp.render_plan(plan).split())  # (unwrapped)
    assert "statistics 768.0 MiB on the device per block (float64 totals: 1.5 GiB in CPU memory)" in table
    assert "solving the largest layer 6.4 GiB" in table
    # DDP: folded round by round into host totals on every rank; one float32 slot per statistic + the one crossing
    eight = mp.memory_plan(shape, cal, device_free=141 * 10**9, devices=8, offload="cpu")
    assert eight["statistic_device_bytes"] == 4 * (entries + 12288**2) and eight["statistic_cpu_bytes"] == 8 * entries
    assert eight["offload_phases"]["solve"] == 2 * shape.block_bytes + plan["solver_bytes"] + eight["block_input_cache_bytes"]
    # batches spanning slots: the owned slots wait on the device (2 of 8 on 4 ranks), the totals in host memory
    spanning = mp.memory_plan(shape, mp.Calibration(statistic="hessian", windows=4, batch_size=2), device_free=141 * 10**9,
                              devices=4, offload="cpu")
    assert spanning["statistic_device_bytes"] == 4 * (2 * entries + 12288**2)
    # too small a device: the fix names the Hessians
    small = mp.memory_plan(shape, cal, device_free=6 * 2**30, devices=1, offload="cpu")
    assert not small["fits"] and "SparseGPT's Hessians need" in small["fix"]


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
@pytest.mark.parametrize("out_features,in_features", [(96, 288), (288, 96)])
def test_solver_workspace_counted_within_the_plan(method, out_features, in_features):
    from pipeline.maths.flavors import get_flavor, make_pruner

    pruner = make_pruner(method, 0.5, None, get_flavor("default"))
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(512, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stat = x.T @ x if pruner.statistic == "hessian" else (x * x).sum(0)
    with LiveBytes() as count:
        pruner.solve(weight, stat, 0.5)
    on_device = count.peak + (8 * in_features**2 if pruner.statistic == "hessian" else 0)  # (+ the total brought over)
    shape = mp.ModelShape("layer", 1, 0, 0, in_features, 1, in_features, [in_features], 2,
                          linear_shapes=[(out_features, in_features)])
    planned = mp.solver_bytes(shape, mp.Calibration(statistic=pruner.statistic))
    assert 0.9 * planned <= on_device <= planned


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
    sgpt = _plan("--model", "configs/plans/llada2_0_flash", "--method", "sink_sparsegpt")  # one Hessian slot on the GPU
    assert sgpt.returncode == 0 and "in CPU memory); solving the largest layer" in " ".join(sgpt.stdout.split())
    # 8 GPUs fit when 1 does: the float64 totals wait in CPU memory on every rank, as in one process
    one, eight = (json.loads(_plan("--model", "configs/plans/llada2_0_flash", "--method", "sink_sparsegpt", "--devices", d,
                                   "--json").stdout) for d in ("1", "8"))
    assert one["fits"] and eight["fits"] and eight["predicted_device_peak_bytes"] <= one["predicted_device_peak_bytes"]
    assert round(eight["predicted_device_peak_bytes"] / 2**30, 1) == 32.2 and eight["statistic_cpu_bytes"] == one["statistic_cpu_bytes"]
    sgpt = _plan("--model", "configs/plans/llada2_0_flash", "--method", "sink_sparsegpt", "--device-memory", "24GB")
    assert sgpt.returncode == 1 and "DOES NOT FIT" in sgpt.stdout and "Hessians" in sgpt.stdout
    for bad in (["--model", "no/such-model"], ["--model", "./missing/config.json"], ["--model", "configs/plans/llada2_0_flash",
                                                                                       "--devices", "0"]):
        proc = _plan(*bad)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: plan --"), proc.stderr


def test_plan_takes_what_fit_takes_from_any_folder(tmp_path):
    import subprocess
    import sys

    def plan(*args):
        return subprocess.run([sys.executable, str(REPO / "cli.py"), "plan", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)

    tiny = plan("--model", "tiny-llada", "--json")  # an embedded name, as fit resolves it
    assert tiny.returncode == 0 and json.loads(tiny.stdout)["blocks"] == 4, tiny.stderr  # its 4 layers
    example = plan("--model", "configs/plans/llada2_0_flash", "--json")  # --help's example, outside the repo root
    assert example.returncode == 0 and json.loads(example.stdout)["fits"], example.stderr
    short = plan("--model", "tiny-llada", "--device-memory", "1MiB", "--seqlen", "4096", "--batch-size", "64")
    fix = [line for line in short.stdout.splitlines() if line.startswith("fix")]
    assert short.returncode == 1 and len(fix) == 1 and "--batch-size" in fix[0] and "data.init_args" not in fix[0], short.stdout
    bare = plan("--model", "tiny-llada", "--device-memory", "80")
    assert bare.returncode == 2 and bare.stderr.strip().splitlines() == [
        "error: plan --device-memory 80: 80 bytes (a bare number is bytes); give a unit, e.g. 80GB"]


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


@pytest.mark.parametrize("pretrained", ["tiny-llada", "tiny-llada-moe"])
def test_two_processes_with_offloaded_sparsegpt_equal_one_and_keep_totals_off_the_device(tmp_path, pretrained):
    """DDP + offload, sink-SparseGPT (batches of one window): each rank's completed slots are folded, round by round,
    into float64 totals in host memory on every rank, in slot order: the masks and weights of 1 process offloaded and
    of 1 resident, bit for bit; on the device only float32 slots (one per statistic and the one being broadcast)."""
    kwargs = dict(method="sink_sparsegpt", batch_size=1, pretrained=pretrained)
    masks, weights, _ = _fit(tmp_path, "none", "none", **kwargs)
    m1, w1, r1 = _fit(tmp_path, "one", "cpu", **kwargs)
    root = tmp_path / "two"
    config = tiny_config(root, method="sink_sparsegpt", pretrained=pretrained, nsamples=4, seqlen=32, timesteps=2,
                         batch_size=1, prune_args={"score": False}, model_args={"offload": "cpu", "score_dense": False},
                         trainer_args={"devices": 2, "strategy": "calibration_ddp_spawn"})
    config["trainer"]["callbacks"].append({"class_path": "tests.slot_watch.SlotWatch",
                                           "init_args": {"path": str(tmp_path / "watch")}})
    proc = run_cli(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m2, w2 = load_file(str(root / "pruned" / "masks.safetensors")), load_file(str(root / "pruned" / "model" / "model.safetensors"))
    for a, b in ((masks, m1), (masks, m2), (weights, w1), (weights, w2)):
        _same(a, b)
    r2 = json.loads((root / "pruned" / "results.json").read_text())
    assert r2["run"]["world_size"] == 2 and r2["memory"]["offload"] == "cpu"
    # counted on each rank: no float64 tensor among what lives on the device; the totals of one block in host memory
    entries = r2["memory"]["statistic_cpu_bytes"] // 8  # the Hessian entries of one block (the plan's count)
    for rank in (0, 1):
        counted = json.loads((tmp_path / "watch" / f"rank{rank}.json").read_text())
        assert counted["host_totals"] is True and counted["float64_on_device"] == 0
        assert 0 < counted["peak_device_bytes"] <= r2["memory"]["statistic_device_bytes"] < 8 * entries
        assert 0 < counted["peak_total_bytes"] <= r2["memory"]["statistic_cpu_bytes"]
