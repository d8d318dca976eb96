"""The contracts between the module, the data, the callbacks and their collaborators are declared protocols
(pipeline/run/protocols.py), found by isinstance, and checked before the run folder exists."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.checkpoint import CalibrationCheckpoint
from callbacks.evaluate import EvaluateExportCallback
from callbacks.prune import PruneCallback
from callbacks.quantize import QuantizeCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.maths.flavors import FLAVORS
from pipeline.maths.pruners import METHODS
from pipeline.model.data import CalibrationData
from pipeline.model.module import DLMModule
from pipeline.run import protocols as p
from tests.runs import run_inprocess, tiny_config


# --- who meets which protocol --------------------------------------------------------------------
def test_the_project_s_objects_meet_the_declared_protocols(tmp_path):
    module, data = DLMModule("minilm-dlm"), CalibrationData(tokenizer="minilm-dlm", nsamples=2, seqlen=32)
    assert isinstance(module, p.OffloadsBlocks) and module.offloader is None  # resident until the plan offloads
    assert isinstance(module, p.ReportsMemory) and isinstance(module, p.GuardsMemory)
    assert isinstance(module, p.ChecksContracts) and isinstance(module, p.NoisesAtTimesteps)
    assert isinstance(data, p.HeldoutData) and isinstance(data, p.OrdersBySlot) and isinstance(data, p.SkipsBatches)
    prune = PruneCallback(method="sparsegpt", sparsity=0.5, reduction_slots=4)
    assert isinstance(prune, p.SizesCalibrationMemory) and prune.calibration_memory() == ("hessian", 4)
    assert PruneCallback(method="magnitude").calibration_memory() == (None, None)
    checkpoint = CalibrationCheckpoint()  # no dirpath: <run folder>/checkpoints
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), callbacks=[checkpoint])
    assert isinstance(checkpoint, p.WritesCheckpoints)
    assert checkpoint.last_checkpoint(trainer) == tmp_path / "checkpoints" / "last.ckpt"
    evaluate = EvaluateExportCallback(save_model=False)
    assert isinstance(evaluate, p.SavesModel) and evaluate.save_model is False and evaluate.dense_windows == {}
    assert not isinstance(PruneCallback(method="wanda"), p.SavesModel)


def test_a_plain_module_meets_the_calibration_protocol_only():
    """The plain module of tests/test_protocol.py: no offloader, no memory plan; the callbacks fall back."""
    from tests.test_protocol import PlainModule

    module = PlainModule(torch.nn.Linear(2, 2), 1, [0.5])
    assert not isinstance(module, p.OffloadsBlocks) and p.module_offloader(module) is None
    assert not isinstance(module, p.ReportsMemory) and not isinstance(module, p.GuardsMemory)
    assert isinstance(module, p.NoisesAtTimesteps)  # (its own choice: the calibration loop is the module's)
    p.check_module(module, "PruneCallback")


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_pruner_turns_sink_scores_into_its_mean(method, flavor):
    """score_term / mean_score are the pruner's own (Σ s / n unless the pruner says otherwise), never looked up by name."""
    from pipeline.maths.flavors import make_pruner

    pruner = make_pruner(method, 0.5, None, FLAVORS[flavor])
    scores = torch.tensor([0.0, 0.5, 1.0])
    total = pruner.score_term(scores) + pruner.score_term(scores)
    assert torch.equal(pruner.mean_score(total, 2), scores)


# --- refusals before the run folder exists -------------------------------------------------------
class ModuleWithoutMaskId(DLMModule):
    """A user's module that dropped what the callbacks read (CalibrationModule's mask_token_id)."""

    def __init__(self, pretrained: str = "minilm-dlm", mask_token_id: int | None = None, timesteps: int = 2,
                 heldout_timesteps: int = 2):
        super().__init__(pretrained=pretrained, mask_token_id=mask_token_id, timesteps=timesteps,
                         heldout_timesteps=heldout_timesteps)
        del self.mask_token_id


def _eager(config):
    config["model"]["init_args"]["attn_implementation"] = "eager"


def _uniform_noise_reference_exact(config):
    config["model"]["init_args"]["noise"] = "uniform"
    config["trainer"]["callbacks"][1]["init_args"]["flavor"] = "reference-exact"


def _slots_not_a_multiple(config):
    config["trainer"]["callbacks"][1]["init_args"]["reduction_slots"] = 3
    config["trainer"].update(devices=2, strategy="calibration_ddp")


def _quantize_slots_not_a_multiple(config):
    config["trainer"]["callbacks"].insert(2, {"class_path": "callbacks.quantize.QuantizeCallback",
                                              "init_args": {"scheme": "w4a16", "group_size": None, "reduction_slots": 3}})
    config["trainer"].update(devices=2, strategy="calibration_ddp")


def _module_without_mask_id(config):
    config["model"]["class_path"] = "tests.test_contracts.ModuleWithoutMaskId"
    config["model"]["init_args"].pop("heldout_timesteps")


def _quantize_after_evaluate(config):
    config["trainer"]["callbacks"].append({"class_path": "callbacks.quantize.QuantizeCallback",
                                           "init_args": {"scheme": "w4a16", "group_size": None}})


def _targets_match_nothing(config):
    config["trainer"]["callbacks"][1]["init_args"]["targets"] = ["no_such_layer"]


def _n_m_does_not_divide(config):
    config["trainer"]["callbacks"][1]["init_args"].update(n_m="2:5", sparsity=None)


def _quantize_group_does_not_divide(config):
    config["trainer"]["callbacks"].insert(2, {"class_path": "callbacks.quantize.QuantizeCallback",
                                              "init_args": {"scheme": "w4a16", "group_size": 100}})


def _hub_dataset_offline(config):  # (the tests run with HF_DATASETS_OFFLINE=1: found out once the data loads)
    config["data"]["init_args"]["dataset"] = "wikitext2"


def _mask_id_outside_the_vocabulary(config):  # (found out once the model is loaded)
    config["model"]["init_args"]["mask_token_id"] = 10**6


REFUSALS = {  # name -> (edit of a small sink_wanda run, what the one error line names)
    "hub_dataset_offline": (_hub_dataset_offline, "data.dataset=wikitext2"),
    "mask_id_outside_the_vocabulary": (_mask_id_outside_the_vocabulary, "model.mask_token_id=1000000"),
    "probe_needs_sdpa": (_eager, "model.attn_implementation='eager'"),
    "noise_vs_flavor": (_uniform_noise_reference_exact, "model.noise='uniform'"),
    "slots_vs_world_size": (_slots_not_a_multiple, "prune reduction_slots=3"),
    "quantize_slots_vs_world_size": (_quantize_slots_not_a_multiple, "quantize reduction_slots=3"),
    "module_protocol": (_module_without_mask_id, "needs a LightningModule with `model` and `mask_token_id`"),
    "quantize_after_evaluate": (_quantize_after_evaluate, "QuantizeCallback is listed after EvaluateExportCallback"),
    "targets_match_nothing": (_targets_match_nothing, "prune targets=['no_such_layer']"),
    "n_m_does_not_divide": (_n_m_does_not_divide, "prune n_m=2:5"),
    "quantize_group_does_not_divide": (_quantize_group_does_not_divide, "quantize group_size=100"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_a_refused_run_leaves_no_run_folder(name, tmp_path):
    edit, names = REFUSALS[name]
    root = tmp_path / "run"
    config = tiny_config(root, method="sink_wanda", nsamples=2, seqlen=32, timesteps=2)
    edit(config)
    code, err = run_inprocess(config, tmp_path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and names in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not root.exists(), sorted(str(q.relative_to(root)) for q in root.rglob("*"))


class FailsWhileCalibrating(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise ValueError("a failure in the middle of calibration")


def test_a_run_that_fails_while_calibrating_keeps_its_run_log(tmp_path):
    """Only a refusal (before the work) takes the run folder away; later, run.log may say why the run failed."""
    root = tmp_path / "run"
    config = tiny_config(root, method="sink_wanda", nsamples=2, seqlen=32, timesteps=2)
    config["trainer"]["callbacks"].append({"class_path": "tests.test_contracts.FailsWhileCalibrating"})
    code, err = run_inprocess(config, tmp_path)
    assert code == 2 and "a failure in the middle of calibration" in err, err[-2000:]
    assert (root / "run.log").is_file()


def test_the_out_of_memory_line_names_the_checkpoint_of_a_default_folder(tmp_path):
    """CalibrationCheckpoint without dirpath (what --checkpoint adds): the resume hint names <run folder>/checkpoints."""
    checkpoint = CalibrationCheckpoint()
    module = DLMModule("minilm-dlm", timesteps=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), callbacks=[checkpoint])
    module.trainer = trainer
    last = Path(tmp_path) / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert f"resume with --ckpt_path {last}" in module.out_of_memory_message()


@pytest.mark.parametrize("name", ["minilm-dlm", "tiny-llada", "tiny-llada-moe", "tiny-dream", "tiny-sdar"])
def test_the_skeleton_has_the_loaded_model_s_layers(name):
    """Preflight checks targets / n_m on the model built on the meta device: the same layers as the loaded model."""
    from pipeline.model.fused_experts import is_fused_experts
    from pipeline.model.loading import load_dlm, model_skeleton

    skeleton = model_skeleton(name)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    prune = PruneCallback(method="wanda", sparsity=0.5)
    loaded = prune.find_layers(load_dlm(name)[0])
    if any(is_fused_experts(m) for m in skeleton.modules()):
        return  # preflight leaves such a model to the check after loading
    found = prune.find_layers(skeleton)
    assert {n: m.in_features for n, m in found.layers.items()} == {n: m.in_features for n, m in loaded.layers.items()}
    assert found.block_layers == loaded.block_layers
