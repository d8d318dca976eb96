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


@pytest.mark.parametrize("model, method, positional, warned", [("minilm-dlm", "sink_wanda", True, True),
                                                              ("minilm-dlm", "wanda", True, False),
                                                              ("minilm-dlm-rel", "sink_wanda", False, False)])
def test_positional_sink_warning(tmp_path, model, method, positional, warned):
    """Warned only where it matters: a positional sink, and a sink-aware method it makes act like the AR recipe."""
    root = tmp_path / "run"
    config = tiny_config(root, pretrained=model, method=method, nsamples=4, seqlen=64, timesteps=4,
                         model_args={"score_dense": False}, prune_args={"score": False, "save_model": False})
    if method == "wanda":  # a sink recipe run with --method wanda keeps the recipe's SinkStatsCallback
        config["trainer"]["callbacks"].insert(0, {"class_path": "callbacks.sink_stats.SinkStatsCallback",
                                                  "init_args": {"output_dir": str(root / "sinks")}})
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-2000:]
    summary = json.loads((root / "sinks" / "sinks.json").read_text())
    assert (summary["positional_sink"] is not None) == positional
    assert ("positional sink" in err) == warned, err[-2000:]
    if positional:
        assert summary["positional_sink"]["position"] == 0 and summary["positional_sink"]["fraction"] >= 0.95
