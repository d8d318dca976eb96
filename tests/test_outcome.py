"""PruneOutcome: what PruneCallback publishes when calibration ends, and the declared callback protocols.

Later stages read the outcome only: EvaluateExportCallback writes the same files from a bare publisher of the
outcome as it does after a real PruneCallback."""
import copy
import dataclasses
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from callbacks.evaluate import EvaluateExportCallback
from callbacks.prune import PruneCallback
from callbacks.sink_stats import SinkStatsCallback
from pipeline.model.data import CalibrationData
from pipeline.run.outcome import PruneOutcome
from pipeline.run.protocols import PublishesPruneOutcome, find_outcome
from tests.test_protocol import PlainModule


class OutcomeOnly(Callback, PublishesPruneOutcome):
    """Publishes a given PruneOutcome and nothing else: what a later stage may rely on."""

    def __init__(self, outcome):
        self._outcome = outcome

    @property
    def prune_outcome(self):
        return self._outcome


def _fit(tmp_path, model, tok, callbacks):
    dm = CalibrationData(tokenizer="minilm-dlm", nsamples=5, seqlen=48, batch_size=2, heldout_samples=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(tmp_path))
    trainer.fit(PlainModule(model, tok.mask_token_id, [0.25, 0.5, 1.0]), datamodule=dm)
    return trainer


def _export(out):
    return EvaluateExportCallback(output_dir=str(out), save_model=False, score=False, score_dense=False)


def test_outcome_fields_after_a_tiny_run(tmp_path, minilm):
    model, tok = minilm
    model = copy.deepcopy(model)
    prune = PruneCallback(method="sink_wanda", sparsity=0.5)
    assert prune.prune_outcome is None  # nothing published before calibration ends
    trainer = _fit(tmp_path, model, tok, [SinkStatsCallback(output_dir=str(tmp_path / "sinks")), prune,
                                          _export(tmp_path / "pruned")])
    outcome = find_outcome(trainer)
    assert isinstance(outcome, PruneOutcome) and outcome is prune.prune_outcome
    assert (outcome.method, outcome.flavor, outcome.solver, outcome.mode) == ("sink_wanda", "default", "Wanda", "oneshot")
    assert outcome.sparsity == 0.5 and outcome.n_m is None and outcome.promise == "row"
    assert len(outcome.layers) == 36 and list(outcome.masks) == list(outcome.layers)
    assert all(isinstance(layer, torch.nn.Linear) for layer in outcome.layers.values())
    assert set(outcome.targets.values()) == {0.5} and set(outcome.achieved.values()) == {0.5}
    assert outcome.average_target == 0.5
    for name, layer in outcome.layers.items():  # the layers hold the masked weights
        assert bool((layer.weight[outcome.masks[name]] == 0).all())
    assert len(outcome.calibrated_pairs) == 15 and outcome.calibrated_pairs[0] == (0, 0, 0)
    assert outcome.timings["calibration_s"] >= outcome.timings["prune_s"] > 0
    assert outcome.updated == frozenset() and not outcome.expert_of
    assert outcome.settings["method"] == "sink_wanda" and outcome.settings["single_pass"] is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.sparsity = 0.4
    with pytest.raises(TypeError):
        outcome.masks["x"] = torch.zeros(1)
    results = json.loads((tmp_path / "pruned" / "results.json").read_text())
    assert results["method"] == "sink_wanda" and results["flavor"] == "default" and results["promise"] == "row"
    assert results["run"]["callback"] == dict(outcome.settings)


def test_export_reads_only_the_outcome(tmp_path, minilm):
    """The files EvaluateExportCallback writes come from the outcome alone: a bare publisher gives the same masks,
    sparsity report and pruning fields as the PruneCallback that made it."""
    model, tok = minilm
    model = copy.deepcopy(model)
    trainer = _fit(tmp_path / "a", model, tok, [PruneCallback(method="magnitude", sparsity=0.25), _export(tmp_path / "a" / "out")])
    outcome = find_outcome(trainer)
    _fit(tmp_path / "b", model, tok, [OutcomeOnly(outcome), _export(tmp_path / "b" / "out")])
    first, second = (json.loads((tmp_path / d / "out" / "results.json").read_text()) for d in ("a", "b"))
    for key in ("method", "flavor", "solver", "mode", "sparsity", "n_m", "promise", "calibrated_pairs", "sparsity_report"):
        assert first[key] == second[key], key
    assert first["sparsity_report"]["meets_target"] and len(first["sparsity_report"]["layers"]) == 36
    masks_a, masks_b = (load_file(str(tmp_path / d / "out" / "masks.safetensors")) for d in ("a", "b"))
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


def test_protocols_are_checked_at_setup(tmp_path, minilm):
    model, tok = minilm
    with pytest.raises(ValueError, match="lists 2 pruning callbacks"):
        _fit(tmp_path / "two", model, tok, [PruneCallback(method="magnitude"), OutcomeOnly(None)])
    with pytest.raises(ValueError, match="PruneCallback is listed after EvaluateExportCallback"):
        _fit(tmp_path / "order", model, tok, [_export(tmp_path / "order" / "out"), PruneCallback(method="magnitude")])
    with pytest.raises(ValueError, match="SinkStatsCallback is listed after PruneCallback"):
        _fit(tmp_path / "sinks", model, tok, [PruneCallback(method="sink_wanda"), SinkStatsCallback(record=False)])
    assert not (tmp_path / "order" / "out").exists()


# --- per-layer targets -----------------------------------------------------------------------------------------

def test_owl_rule_keeps_the_parameter_weighted_average():
    from pipeline.maths.allocation import outlier_ratio, owl_targets

    ratios, sizes = [0.01, 0.04, 0.02, 0.03], [100, 300, 200, 400]
    targets = owl_targets(ratios, sizes, average=0.6, lmbda=0.05)
    assert abs(sum(t * n for t, n in zip(targets, sizes)) / sum(sizes) - 0.6) < 1e-12
    assert sorted(range(4), key=lambda i: targets[i]) == sorted(range(4), key=lambda i: -ratios[i])  # more outliers, less pruned
    assert abs((max(targets) - min(targets)) - 2 * 0.05) < 1e-12  # the ratios span [0, 2λ]
    assert owl_targets([0.02, 0.02], [5, 7], 0.5, 0.1) == [0.5, 0.5]
    scores = [torch.tensor([1.0, 1.0, 1.0, 9.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]  # mean 2: one score above 2·2
    assert outlier_ratio(scores, m=2.0) == 1 / 8


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "wanda", "n_m": "2:4", "sparsity": {"*": 0.5}}, "n_m=2:4 prunes every layer alike"),
    ({"method": "magnitude", "sparsity": "owl"}, "needs a calibrated method"),
    ({"method": "wanda", "sparsity": "owl", "mode": "sequential"}, "mode oneshot"),
    ({"method": "wanda", "sparsity": {"profile": "owl", "average": 0.5, "lmbda": 0.3}}, "lower lmbda"),
    ({"method": "wanda", "sparsity": {"*.query": 1.5}}, r"sparsity\['\*.query'\]=1.5 must be in \[0, 1\)"),
    ({"method": "wanda", "sparsity": "olw"}, "a profile must be one of owl"),
])
def test_per_layer_sparsity_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruneCallback(**kwargs)


def test_glob_targets_reach_their_layers(tmp_path, minilm):
    model, tok = minilm
    model = copy.deepcopy(model)
    prune = PruneCallback(method="wanda", sparsity={"*.attention.self.*": 0.25, "*": 0.625})
    trainer = _fit(tmp_path, model, tok, [prune])
    outcome = find_outcome(trainer)
    for name, layer in outcome.layers.items():
        want = 0.25 if ".attention.self." in name else 0.625
        assert outcome.targets[name] == want
        zeros = (layer.weight == 0).sum(dim=1)
        assert bool((zeros == int(layer.in_features * want)).all()), name
    assert 0.25 < outcome.sparsity < 0.625 and abs(outcome.sparsity - outcome.average_target) < 1e-12
    with pytest.raises(ValueError, match="no glob matches layer bert.encoder.layer.0.attention.self.query"):
        _fit(tmp_path / "b", model, tok, [PruneCallback(method="wanda", sparsity={"*.output.*": 0.5})])


def test_owl_targets_from_sink_weighted_statistics(tmp_path, minilm):
    """OWL on the real model: blocks get different targets, their parameter-weighted mean is the requested average,
    each row reaches its layer's target, the report checks every layer against its own target; the outlier ratios
    come from the (1 − s)-weighted statistics, so sink-aware and plain Wanda get different targets."""
    model, tok = minilm
    outcomes, reports = {}, {}
    for method in ("sink_wanda", "wanda"):
        pruned = copy.deepcopy(model)
        callbacks = [PruneCallback(method=method, sparsity={"profile": "owl", "average": 0.5, "lmbda": 0.1, "m": 5}),
                     _export(tmp_path / method)]
        if method == "sink_wanda":
            callbacks.insert(0, SinkStatsCallback(record=False))
        outcomes[method] = find_outcome(_fit(tmp_path / f"run-{method}", pruned, tok, callbacks))
        reports[method] = json.loads((tmp_path / method / "results.json").read_text())["sparsity_report"]
    outcome = outcomes["sink_wanda"]
    assert len(set(outcome.targets.values())) > 2 and abs(outcome.average_target - 0.5) < 1e-12
    assert max(outcome.targets.values()) - min(outcome.targets.values()) <= 0.2 + 1e-12
    for name, layer in outcome.layers.items():
        zeros = (layer.weight == 0).sum(dim=1)
        assert bool((zeros == int(layer.in_features * outcome.targets[name])).all()), name
    report = reports["sink_wanda"]
    assert report["meets_target"] and report["per_layer"] and {r["target"] for r in report["layers"]} == set(outcome.targets.values())
    assert outcomes["wanda"].targets != outcome.targets


def test_report_checks_what_the_solver_promises(tmp_path, minilm):
    """The reference's magnitude rule (one threshold per layer) leaves some rows under the row target: the report
    checks the layer as a whole, as that rule promises, and a correct run is not shown below target."""
    model, tok = minilm
    model = copy.deepcopy(model)
    _fit(tmp_path, model, tok, [PruneCallback(method="magnitude", sparsity=0.5, flavor="reference"), _export(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "results.json").read_text())["sparsity_report"]
    assert report["promise"] == "layer" and report["meets_target"]
    rows_short = 0
    for row, layer in zip(report["layers"], find_outcome_layers(model)):
        zeros = (layer.weight == 0).sum(dim=1)
        rows_short += int((zeros < int(layer.in_features * 0.5)).sum())
        assert row["rows_below_target"] is None and row["zeros"] >= int(layer.weight.numel() * 0.5)
    assert rows_short > 0  # what a per-row check would have flagged


def find_outcome_layers(model):
    from pipeline.model.calibration import target_linears

    return list(target_linears(model).values())


def test_one_flavor_field_chooses_everything():
    from pipeline.maths import pruners as pr
    from pipeline.maths.flavors import get_flavor, make_pruner, with_noise_order

    default, reference, exact = (get_flavor(n) for n in ("default", "reference", "reference-exact"))
    assert (default.noise_order, reference.noise_order, exact.noise_order) == ("per_sample", "per_sample", "reference")
    assert (default.slots(None, 1), reference.slots(None, 1), exact.slots(None, 1), exact.slots(None, 2)) == (8, 8, 1, 8)
    assert exact.slots(4, 1) == 4  # the user's count wins
    assert type(make_pruner("sink_sparsegpt", 0.5, flavor="reference-exact")) is pr.ReferenceSinkSparseGPT
    assert type(make_pruner("sink_wanda", 0.5, flavor="default")) is pr.Wanda
    mass = torch.tensor([[1.0, 9.0, 1.0, 1.0]])
    assert torch.equal(exact.sink_scores(mass, 2.0, 5.0, None), pr.rf.collector_sink_scores(mass, 2.0, 5.0))
    assert with_noise_order("reference", "reference") == "reference-exact"
    with pytest.raises(ValueError, match="prune flavor='nope' is unknown; choose one of default, reference, reference-exact"):
        PruneCallback(method="wanda", flavor="nope")


def test_owl_profile_from_a_config_file(tmp_path):
    """The profile as a user writes it in YAML, through the CLI: per-layer targets in results.json."""
    from tests.runs import run_inprocess, tiny_config

    config = tiny_config(tmp_path, method="wanda", sparsity={"profile": "owl", "average": 0.5, "lmbda": 0.05},
                         nsamples=2, seqlen=32, timesteps=2, prune_args={"save_model": False, "score": False},
                         model_args={"score_dense": False})
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "pruned" / "results.json").read_text())["sparsity_report"]
    assert report["per_layer"] and report["meets_target"] and report["target"] == 0.5


def test_a_misordered_callback_list_is_refused_before_the_run_folder_exists(tmp_path):
    from tests.runs import run_inprocess, tiny_config

    root = tmp_path / "run"
    config = tiny_config(root, method="sink_wanda", nsamples=2, seqlen=32, timesteps=2)
    callbacks = config["trainer"]["callbacks"]
    callbacks[0], callbacks[1] = callbacks[1], callbacks[0]  # PruneCallback before SinkStatsCallback
    code, err = run_inprocess(config, tmp_path)
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: trainer.callbacks: SinkStatsCallback is listed after")
    assert not root.exists()


def test_check_module_sees_submodules_as_python_312_does():
    """Python >= 3.12 checks a runtime protocol's data members with getattr_static, blind to nn.Module submodules:
    the module check must accept a LightningModule whose `model` is a submodule, and refuse one without it."""
    import inspect

    import lightning as L
    import torch

    from pipeline.run.protocols import check_module

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)
            self.mask_token_id = 1

    module = Wrapped()
    with pytest.raises(AttributeError):
        inspect.getattr_static(module, "model")  # what 3.12's isinstance would look at
    check_module(module, "SinkStatsCallback")
    del module.model
    with pytest.raises(ValueError, match="needs a LightningModule with `model`"):
        check_module(module, "SinkStatsCallback")
