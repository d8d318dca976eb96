"""Calibration on 2 processes (gloo) gives the same masks and sink statistics as on 1, bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.runs import run_cli, tiny_config


def _fit(tmp_path, name, devices, nsamples, method):
    root = tmp_path / name
    trainer = {"devices": devices}
    if devices > 1:
        trainer["strategy"] = "calibration_ddp_spawn"
    proc = run_cli(tiny_config(root, method=method, nsamples=nsamples, trainer_args=trainer), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.parametrize("method,nsamples", [("sink_wanda", 5), ("sink_sparsegpt", 4)])
def test_two_processes_equal_one(tmp_path, method, nsamples):
    one = _fit(tmp_path, "one", 1, nsamples, method)
    two = _fit(tmp_path, "two", 2, nsamples, method)
    m1, m2 = load_file(str(one / "pruned" / "masks.safetensors")), load_file(str(two / "pruned" / "masks.safetensors"))
    assert m1.keys() == m2.keys() and len(m1) == 36
    for name in m1:
        assert torch.equal(m1[name], m2[name]), name
    w1 = load_file(str(one / "pruned" / "model" / "model.safetensors"))
    w2 = load_file(str(two / "pruned" / "model" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    s1 = json.loads((one / "sinks" / "sinks.json").read_text())
    s2 = json.loads((two / "sinks" / "sinks.json").read_text())
    assert s1 == s2 and s1["samples"] == nsamples
    r1 = json.loads((one / "pruned" / "results.json").read_text())
    r2 = json.loads((two / "pruned" / "results.json").read_text())
    assert r1["pruned"]["heldout"] == r2["pruned"]["heldout"]
    assert r2["run"]["world_size"] == 2
