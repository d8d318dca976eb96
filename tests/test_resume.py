"""Interrupted runs leave no partial output; a checkpointed calibration resumes to the same masks."""
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import pipeline.run.outputs
from tests.runs import run_inprocess, tiny_config


class InterruptAfter(Callback):
    """Simulates Ctrl-C after a number of calibration batches."""

    def __init__(self, batches: int = 1):
        self.batches = batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx + 1 >= self.batches:
            raise KeyboardInterrupt


def _masks(root):
    return load_file(str(root / "pruned" / "masks.safetensors"))


def _leftovers(root):
    return sorted(p.name for p in root.glob(".*tmp*")) + sorted(p.name for p in (root / "pruned").glob(".*tmp*")) if root.exists() else []


@pytest.mark.parametrize("method", ["sink_wanda", "sink_sparsegpt"])
def test_interrupt_then_resume_gives_identical_masks(tmp_path, method):
    ref_root = tmp_path / "reference"
    code, err = run_inprocess(tiny_config(ref_root, method=method, nsamples=6), tmp_path)
    assert code == 0, err[-2000:]

    root = tmp_path / "resumed"
    config = tiny_config(root, method=method, nsamples=6)
    ckpt = {"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(root / "ckpt")}}
    interrupted = {**config, "trainer": {**config["trainer"], "callbacks": config["trainer"]["callbacks"] + [
        ckpt, {"class_path": "tests.test_resume.InterruptAfter", "init_args": {"batches": 2}}]}}
    code, _ = run_inprocess(interrupted, tmp_path)
    assert code != 0
    assert not (root / "pruned").exists() and not _leftovers(root)
    assert (root / "ckpt" / "last.ckpt").exists()
    state = torch.load(root / "ckpt" / "last.ckpt", weights_only=False)
    assert state["state_dict"] == {}  # no model weights in calibration checkpoints

    resumed = {**config, "trainer": {**config["trainer"], "callbacks": config["trainer"]["callbacks"] + [ckpt]}}
    code, err = run_inprocess(resumed, tmp_path, "--ckpt_path", str(root / "ckpt" / "last.ckpt"))
    assert code == 0, err[-2000:]
    ref, got = _masks(ref_root), _masks(root)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    real_save = pipeline.run.outputs.save_model

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)  # the model files are on disk, in the temp dir
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.run.outputs, "save_model", save_then_crash)
    root = tmp_path / "run"
    code, _ = run_inprocess(tiny_config(root, nsamples=2, timesteps=1), tmp_path)
    assert code != 0
    assert not (root / "pruned").exists()
    assert not _leftovers(root)
