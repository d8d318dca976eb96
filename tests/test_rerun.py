"""Run it again, stop and resume: a rerun goes to a fresh version folder (or --overwrite replaces the previous
run's own results), a stopped run names its checkpoint and the exact command that resumes it, and
--print_config shows the config the run will use."""
from __future__ import annotations

import contextlib
import io
import shlex
import signal

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import cli
from tests.runs import tiny_config


class StopOnce(Callback):
    """Ctrl-C after the second calibration batch, the first time only (the resumed run goes through)."""

    fired = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1 and not StopOnce.fired:
            StopOnce.fired = True
            raise cli.RunInterrupted(signal.SIGINT)


def _main(*args: str) -> tuple[int, str, str]:
    """`sinkprune ARGS` in this process: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _recipe(tmp_path, root) -> str:
    """A small recipe whose results go to the run folder's default places (root/sinks, root/pruned)."""
    config = tiny_config(root, nsamples=4, seqlen=32, timesteps=2,
                         prune_args={"save_model": False, "score": False, "score_dense": False})
    for cb in config["trainer"]["callbacks"]:
        cb["init_args"].pop("output_dir", None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _masks(folder):
    return load_file(str(folder / "pruned" / "masks.safetensors"))


def test_rerun_versions_stop_names_checkpoint_and_resume_command(tmp_path):
    root = tmp_path / "run"
    recipe = _recipe(tmp_path, root)
    code, out, err = _main("fit", "--config", recipe)
    assert code == 0, err[-2000:]
    first = _masks(root)
    assert "held-out perplexity" not in out  # score: false, score_dense: false: no table of dashes

    # the same command again: the previous results stay, this run stops in a fresh version folder
    StopOnce.fired = False
    code, _, err = _main("fit", "--config", recipe, "--checkpoint", "--trainer.callbacks+=tests.test_rerun.StopOnce")
    assert code == 130, err[-2000:]
    said = " ".join(err.split())  # the notice is wrapped at 80 columns
    assert f"{root} holds a previous run's results (kept); this run writes to {root / 'version_1'}" in said
    stop = [line for line in err.splitlines() if line.startswith("error:")]
    ckpt = root / "version_1" / "checkpoints" / "last.ckpt"
    assert len(stop) == 1 and "stopped by SIGINT while calibrating" in stop[0] and f"checkpoint {ckpt};" in stop[0], err
    assert "nothing was saved" not in stop[0] and ckpt.is_file()
    assert not (root / "version_1" / "pruned").exists() and _masks(root).keys() == first.keys()

    # the printed command, as given, resumes in the same version folder and ends with the masks of an uninterrupted run
    command = shlex.split(stop[0].split("resume with: ", 1)[1])
    assert command[:2] == ["sinkprune", "fit"] and command[-2:] == ["--ckpt_path", str(ckpt)]
    assert command[-4:-2] == ["--output", str(root / "version_1")] and "tests.test_rerun.StopOnce" in command[-5]
    code, _, err = _main(*command[1:])
    assert code == 0, err[-2000:]
    assert "holds a previous run's results" not in err
    resumed = _masks(root / "version_1")
    assert resumed.keys() == first.keys() and all(torch.equal(first[k], resumed[k]) for k in first)

    # --overwrite replaces the run folder's own previous results in place; no new version folder
    before = (root / "pruned" / "results.json").stat().st_mtime_ns
    code, _, err = _main("fit", "--config", recipe, "--overwrite")
    assert code == 0, err[-2000:]
    assert (root / "pruned" / "results.json").stat().st_mtime_ns > before and not (root / "version_2").exists()
    assert (root / "version_1" / "pruned" / "masks.safetensors").is_file()  # the other run's results are untouched


def test_print_config_applies_the_short_flags():
    code, out, err = _main("fit", "--config", "tiny_sink50", "--method", "wanda", "--n-m", "2:4", "--checkpoint",
                           "--overwrite", "--output", "runs/elsewhere", "--print_config")
    assert code == 0, err[-2000:]
    config = yaml.safe_load(out)
    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in config["trainer"]["callbacks"]}
    assert callbacks["PruneCallback"]["method"] == "wanda" and callbacks["PruneCallback"]["n_m"] == "2:4"
    assert callbacks["PruneCallback"]["sparsity"] is None
    assert callbacks["CalibrationCheckpoint"]["dirpath"] is None  # <run folder>/checkpoints
    assert callbacks["EvaluateExportCallback"]["overwrite"] and callbacks["SinkStatsCallback"]["overwrite"]
    assert config["trainer"]["default_root_dir"] == "runs/elsewhere"


def test_stop_without_checkpoint_says_how_to_make_a_run_resumable(tmp_path):
    StopOnce.fired = False
    code, _, err = _main("fit", "--config", _recipe(tmp_path, tmp_path / "run"),
                         "--trainer.callbacks+=tests.test_rerun.StopOnce")
    stop = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 130 and len(stop) == 1 and "nothing was saved" in stop[0] and "--checkpoint" in stop[0], err
    assert not (tmp_path / "run" / "pruned").exists()


def test_run_folder_follows_lightnings_version_convention(tmp_path):
    from pipeline.run.outputs import run_folder

    root = tmp_path / "run"

    def taken(folder):
        return (folder / "pruned").is_dir()

    assert run_folder(root, taken) == root  # a first run writes the run folder itself
    (root / "pruned").mkdir(parents=True)
    assert run_folder(root, taken) == root / "version_1"
    (root / "version_1").mkdir()  # made by a stopped run, or by rank 0 of this run: still the one to write
    assert run_folder(root, taken) == root / "version_1"
    (root / "version_1" / "pruned").mkdir()
    assert run_folder(root, taken) == root / "version_2"


def test_sink_table_wraps_words_and_never_cuts_a_value():
    from rich.console import Console

    from pipeline.evaluation.sink_tables import render_timestep_table

    kinds = {"punctuation": 123, "bos/cls": 45, "mask": 6}
    rows = [{"t": t, "top1_share": 0.3456, "normalized_entropy": 0.7712, "modal_dominant_position": 117,
             "modal_position_fraction": 0.5, "mean_sinks_per_sample": 1.25, "dominant_kinds": kinds} for t in (0.1, 1.0)]
    text = io.StringIO()
    Console(file=text, width=80).print(render_timestep_table({"sink_position_variance": 342.43, "uniform_share": 1 / 128,
                                                              "timesteps": rows}))
    lines = text.getvalue().splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text.getvalue()
    assert all(value in text.getvalue() for value in ("0.10", "0.346", "44.2x", "0.771", "117", "50%", "1.25", "342.43"))


def test_resume_command_names_the_program_as_invoked(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/opt/tools/sink prune/cli.py", "fit"])
    assert cli.invoked_as() == "python '/opt/tools/sink prune/cli.py'"
    monkeypatch.setattr("sys.argv", ["../cli.py", "fit"])
    assert cli.invoked_as() == "python ../cli.py"
    monkeypatch.setattr("sys.argv", ["/work/venv/bin/sinkprune", "fit"])
    assert cli.invoked_as() == "sinkprune"


def test_a_copied_recipe_takes_its_pieces_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my.yaml"
    mine.write_text((cli.CONFIG_DIR / "tiny_sink50.yaml").read_text())
    before = mine.read_bytes()
    code, out, err = _main("fit", "--config", "my.yaml", "--print_config")
    assert code == 0, err[-2000:]
    config = yaml.safe_load(out)
    assert config["model"]["init_args"]["pretrained"] == "minilm-dlm"
    assert [cb["class_path"].rsplit(".", 1)[1] for cb in config["trainer"]["callbacks"]] == [
        "SinkStatsCallback", "PruneCallback", "EvaluateExportCallback"]
    assert mine.read_bytes() == before  # the user's file is not written

    mine.write_text(before.decode().replace("model/minilm_dlm.yaml", "model/no_such_piece.yaml"))
    code, _, err = _main("fit", "--config", "my.yaml")
    assert code == 2 and err.strip().splitlines() == [
        f"error: --config my.yaml: its piece model/no_such_piece.yaml is neither next to it ({tmp_path}) nor among the "
        "package's configs; copy the piece there or give its absolute path"]
