"""Sinks that move: the forward process masks every position by default, and a sink pinned to one absolute
position is named (minilm-dlm's is BERT's position 0) while minilm-dlm-rel's moving sink is not."""
import json

import pytest
import torch

from pipeline.model.calibration import noised_batches
from pipeline.model.module import DLMModule
from pipeline.maths.sinks import positional_sink
from tests.runs import run_inprocess, tiny_config


def _batch():
    ids = torch.arange(2 * 16).reshape(2, 16) + 1000
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 0] = True  # the data module marks its leading [CLS]/BOS
    return {"input_ids": ids, "keep": keep, "index": torch.tensor([0, 1])}


@pytest.mark.parametrize("keep_special, position_0_masked", [(False, True), (True, False)])
def test_forward_process_masks_special_tokens_by_default(keep_special, position_0_masked):
    module = DLMModule(pretrained="minilm-dlm", keep_special_tokens=keep_special)
    batch = {**_batch(), "keep": module.keep(_batch())}
    (nb,) = noised_batches(batch, [1.0], mask_token_id=103, seed=0)
    assert bool(nb.masked[:, 0].all()) == position_0_masked
    assert nb.masked[:, 1:].all()  # t = 1: p = 1 everywhere else


def test_positional_sink_rule():
    assert positional_sink([0] * 19 + [5], ["mask"] * 10 + ["bos/cls"] * 10)["fraction"] == 0.95
    assert positional_sink([0] * 18 + [5, 7], ["word"] * 20) is None
    assert positional_sink([], []) is None


@pytest.mark.parametrize("model, positional", [("minilm-dlm", True), ("minilm-dlm-rel", False)])
def test_positional_sink_warning(tmp_path, model, positional):
    root = tmp_path / "run"
    config = tiny_config(root, pretrained=model, nsamples=4, seqlen=64, timesteps=4,
                         model_args={"score_dense": False}, prune_args={"score": False, "save_model": False})
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-2000:]
    summary = json.loads((root / "sinks" / "sinks.json").read_text())
    assert (summary["positional_sink"] is not None) == positional
    assert ("positional sink" in err) == positional, err[-2000:]
    if positional:
        assert summary["positional_sink"]["position"] == 0 and summary["positional_sink"]["fraction"] >= 0.95
