"""Every YAML in configs/ validates; a fit without a pruning callback leaves the weights untouched."""
import hashlib
from pathlib import Path

import pytest
import torch

from callbacks.evaluate import EvaluateExportCallback
from cli import SinkPruneCLI, TRAINER_DEFAULTS
from pipeline.model.data import CalibrationData
from pipeline.model.loading import load_dlm
from pipeline.model.module import DLMModule

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


def make_cli(args, run=True):
    return SinkPruneCLI(
        DLMModule, CalibrationData, subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS, save_config_callback=None, args=args, run=run,
    )


def test_there_are_configs_for_llada_and_tiny():
    names = {p.stem for p in CONFIGS}
    assert {"llada_sink50", "tiny_sink50", "tiny_llada_sink50"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(config, capsys):
    with pytest.raises(SystemExit) as exc:
        make_cli(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: pipeline.model.module.DLMModule" in printed


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    dense = next(p for p in CONFIGS if p.stem == "tiny_dense")  # recipes compose files; this one spells its keys out
    bad.write_text(dense.read_text().replace("seed: 0", "seed: 0\n    sede: 1", 1))
    with pytest.raises(SystemExit) as exc:
        make_cli(["fit", "--config", str(bad), "--print_config"])
    assert exc.value.code != 0
    assert "sede" in capsys.readouterr().err


def _digest(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_fit_without_pruning_leaves_weights_untouched(tmp_path):
    cli = make_cli([
        "--config", "configs/tiny_dense.yaml", "--data.init_args.nsamples=4", "--data.init_args.heldout_samples=4",
        "--model.init_args.timesteps=2", f"--trainer.default_root_dir={tmp_path}",
    ], run=False)
    assert cli.model.model is None  # loaded by configure_model, after every config check
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert _digest(cli.model.model) == _digest(load_dlm("minilm-dlm")[0])
    dense = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EvaluateExportCallback)).dense["heldout"]
    assert dense["tokens"] == 4 * 127 and 0 < dense["nll"] < 20
    assert cli.trainer.global_step == 0 and cli.trainer.current_epoch == 1
