"""SIGTERM (what SLURM and Kubernetes send) and SIGINT stop a real `cli.py fit` within seconds, in any phase:
non-zero exit, one line saying where it stopped, no partial output; a checkpoint taken before the signal
still resumes to bit-identical masks."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.faults import Stamp
from tests.runs import REPO, cli_command, run_inprocess, tiny_config

TASKS = [{"name": "wiki_cloze_offline", "num_fewshot": 0, "mc_num": 4, "limit": 40}]


def _start(config: dict, tmp_path, *extra) -> subprocess.Popen:
    argv, env = cli_command(config, tmp_path, *extra)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _signal_at_stamp(proc: subprocess.Popen, signum: int, delay: float, timeout: float = 600) -> tuple[float, str]:
    """Send signum `delay` s after the STAMP line; return (seconds from signal to exit, stderr)."""
    lines: list[str] = []
    stamped = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(Stamp.PREFIX):
                stamped.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert stamped.wait(timeout), "".join(lines)[-3000:]
    time.sleep(delay)
    sent = time.time()
    proc.send_signal(signum)
    proc.wait(timeout=60)
    elapsed = time.time() - sent
    reader.join(timeout=10)
    return elapsed, "".join(lines)


def _with(config: dict, *callbacks: dict, before_prune: bool = True) -> dict:
    cbs = list(config["trainer"]["callbacks"])
    at = len(cbs) - 1 if before_prune else len(cbs)
    config["trainer"]["callbacks"] = cbs[:at] + list(callbacks) + cbs[at:]
    return config


def _stamp(**kw) -> dict:
    return {"class_path": "tests.faults.Stamp", "init_args": kw}


def _no_outputs(root) -> None:
    left = [p.name for p in root.rglob("*") if p.name.startswith(".") or p.name in ("pruned", "sinks")] if root.exists() else []
    assert not left, left


@pytest.mark.parametrize("signum, hook, where", [
    (signal.SIGTERM, "on_train_end", "pruned model"),       # during pruned scoring / lm-eval tasks
    (signal.SIGINT, "on_fit_start", "dense model"),         # during dense scoring
])
def test_signal_stops_the_run_within_seconds(tmp_path, signum, hook, where):
    root = tmp_path / "run"
    config = _with(tiny_config(root, nsamples=4, timesteps=2, prune_args={"tasks": TASKS},
                               data_args={"heldout_samples": 32}), _stamp(hook=hook))
    elapsed, err = _signal_at_stamp(_start(config, tmp_path), signum, delay=1.0)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert elapsed < 10, f"{elapsed:.1f} s to stop"
    assert len(errors) == 1 and signal.Signals(signum).name in errors[0] and where in errors[0], err[-3000:]
    assert "Traceback" not in err
    _no_outputs(root)


def test_sigterm_in_calibration_then_resume_gives_identical_masks(tmp_path):
    ref_root = tmp_path / "reference"
    code, err = run_inprocess(tiny_config(ref_root, nsamples=6), tmp_path)
    assert code == 0, err[-2000:]

    root = tmp_path / "resumed"
    ckpt = {"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(root / "ckpt")}}
    config = _with(tiny_config(root, nsamples=6), ckpt, before_prune=False)
    proc = _start(_with(config, _stamp(hook="on_train_batch_end", batch=2, hold=120), before_prune=False), tmp_path)
    elapsed, err = _signal_at_stamp(proc, signal.SIGTERM, delay=0.2)
    assert proc.returncode == 128 + signal.SIGTERM and elapsed < 10, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("error:")][0]
    assert "calibrating" in error and f"--ckpt_path {root / 'ckpt' / 'last.ckpt'}" in error, error
    _no_outputs(root)

    code, err = run_inprocess(config, tmp_path, "--ckpt_path", str(root / "ckpt" / "last.ckpt"))
    assert code == 0, err[-2000:]
    ref, got = load_file(str(ref_root / "pruned" / "masks.safetensors")), load_file(str(root / "pruned" / "masks.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
