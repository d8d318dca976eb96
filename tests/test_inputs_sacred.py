"""Inputs are sacred, and every error comes before the work.

Each case is a plausible mistake on top of a small `cli.py fit` run.  Every one must end with: a non-zero
exit, exactly one `error:` line that names the field, no traceback, well under a calibration's time, no
output folder left behind, every input (model folder, dataset, masks, checkpoint) byte-identical, and,
where the input allows, no model weights loaded at all (a spy on `load_dlm` counts the loads).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pipeline.model.module
from pipeline.model.loading import resolve_path
from tests.runs import run_inprocess, tiny_config

BEFORE, AFTER = "before_load", "after_load"  # where the refusal must come at the latest


def digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class Ctx:
    """A fresh sandbox per case: a local copy of tiny-llada, a text dataset, a saved mask file."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "run"
        self.model = tmp / "inputs" / "model"
        shutil.copytree(resolve_path("tiny-llada"), self.model)
        self.data = tmp / "inputs" / "corpus.txt"
        self.data.write_text("\n\n".join(f"Article {i}. " + "The river flows past the old mill and the town. " * 40 for i in range(20)))
        self.masks = tmp / "inputs" / "masks"
        self.masks.mkdir()
        save_file({"model.transformer.blocks.0.q_proj": torch.ones(192, 192, dtype=torch.uint8)}, str(self.masks / "masks.safetensors"))
        self.inputs = [self.model, self.data, self.masks]

    def config(self, **kw) -> dict:
        kw.setdefault("pretrained", str(self.model))
        kw.setdefault("data_args", {"dataset": str(self.data)})
        return tiny_config(self.root, **kw)

    def with_prune(self, **prune_args) -> dict:
        return self.config(prune_args=prune_args)


def _nested(config: dict, section: str, **values) -> dict:
    config[section]["init_args"].update(values)
    return config


def _sink_cb(config: dict) -> dict:
    return config["trainer"]["callbacks"][0]["init_args"]


def _prune_cb(config: dict) -> dict:
    return config["trainer"]["callbacks"][-1]["init_args"]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _with_checkpoint(c: Ctx, config: dict, dirpath: Path) -> dict:
    config["trainer"]["callbacks"].append({"class_path": "callbacks.checkpoint.CalibrationCheckpoint", "init_args": {"dirpath": str(dirpath)}})
    return config


def _case_truncated_weights(c: Ctx):
    _truncate(c.model / "model.safetensors", 100_000)
    return c.config(), ()


def _case_corrupt_config(c: Ctx):
    _write(c.model / "config.json", "{ not json")
    return c.config(), ()


def _case_wrong_mask_shapes(c: Ctx):
    save_file({"model.transformer.blocks.0.q_proj": torch.ones(64, 64, dtype=torch.uint8)}, str(c.masks / "masks.safetensors"))
    return c.with_prune(masks_from=str(c.masks)), ()


def _case_mask_of_unknown_layer(c: Ctx):
    save_file({"model.transformer.blocks.9.q_proj": torch.ones(192, 192, dtype=torch.uint8)}, str(c.masks / "masks.safetensors"))
    return c.with_prune(masks_from=str(c.masks)), ()


def _case_truncated_masks(c: Ctx):
    _truncate(c.masks / "masks.safetensors", 200)
    return c.with_prune(masks_from=str(c.masks)), ()


def _case_garbage_checkpoint(c: Ctx):
    ckpt = _write(c.tmp / "inputs" / "ckpt" / "last.ckpt", b"\x80\x04garbage, not a pickle" * 10)
    c.inputs.append(ckpt)
    return c.config(), ("--ckpt_path", str(ckpt))


def _case_binary_txt(c: Ctx):
    _write(c.data, b"text then \xff\xfe\x00\x81 binary")
    return c.config(), ()


def _case_malformed_jsonl(c: Ctx):
    data = _write(c.tmp / "inputs" / "corpus.jsonl", '{"text": "fine"}\n{"text": "broken\n')
    c.inputs.append(data)
    return c.config(data_args={"dataset": str(data)}), ()


def _case_jsonl_without_text(c: Ctx):
    data = _write(c.tmp / "inputs" / "corpus.jsonl", '{"body": "no text field"}\n')
    c.inputs.append(data)
    return c.config(data_args={"dataset": str(data)}), ()


def _case_malformed_json_array(c: Ctx):
    data = _write(c.tmp / "inputs" / "corpus.json", '[{"text": "a"},\n {"text": }]')
    c.inputs.append(data)
    return c.config(data_args={"dataset": str(data)}), ()


def _case_yaml_syntax(c: Ctx):
    bad = _write(c.tmp / "bad.yaml", "model:\n  init_args: [1, 2\n")
    return None, ("--config", str(bad))


def _case_binary_yaml(c: Ctx):
    bad = _write(c.tmp / "bad.yaml", b"\xff\xfe\x00binary")
    return None, ("--config", str(bad))


def _case_missing_config(c: Ctx):
    return None, ("--config", str(c.tmp / "no_such.yaml"))


def _case_not_written_by_us(c: Ctx):
    out = c.root / "pruned"
    _write(out / "precious.txt", "keep me")
    c.inputs.append(out)
    return c.with_prune(overwrite=True), ()


def _case_output_parent_is_file(c: Ctx):
    _write(c.tmp / "afile", "x")
    return c.with_prune(output_dir=str(c.tmp / "afile" / "pruned")), ()


def _case_output_is_file(c: Ctx):
    f = _write(c.tmp / "afile", "x")
    c.inputs.append(f)
    return c.with_prune(output_dir=str(f), overwrite=True), ()


def _case_sinks_out_is_file(c: Ctx):
    f = _write(c.tmp / "afile", "x")
    c.inputs.append(f)
    config = c.config()
    _sink_cb(config)["output_dir"] = str(f)
    return config, ()


def _case_full_disk(c: Ctx, monkeypatch):
    import pipeline.run.outputs

    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.run.outputs.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    return c.config(), ()


def _simple(**kw):
    return lambda c: (c.config(**kw), ())


def _prune(**kw):
    return lambda c: (c.with_prune(**kw), ())


def _sink(**kw):
    return lambda c: (_sink_cb_set(c.config(), **kw), ())


def _model(**kw):
    return lambda c: (_nested(c.config(), "model", **kw), ())


def _data(**kw):
    return lambda c: (_nested(c.config(), "data", **kw), ())


def _args(*extra, **kw):
    return lambda c: (c.config(**kw), extra)


CASES = {
    # --- the list: outputs that would touch an input ---------------------------------------
    "output_dir_is_model_folder_overwrite": (lambda c: (c.with_prune(output_dir=str(c.model), overwrite=True), ()), "evaluate.output_dir", BEFORE),
    "output_dir_inside_model_folder": (lambda c: (c.with_prune(output_dir=str(c.model / "pruned")), ()), "lies inside the input model.pretrained", BEFORE),
    "output_dir_contains_model_folder": (lambda c: (c.with_prune(output_dir=str(c.tmp / "inputs"), overwrite=True), ()), "contains the input", BEFORE),
    "sinks_out_dir_inside_model": (lambda c: (_sink_cb_set(c.config(), output_dir=str(c.model / "sinks")), ()), "SinkStatsCallback.output_dir", BEFORE),
    "output_dir_is_dataset_file": (lambda c: (c.with_prune(output_dir=str(c.data), overwrite=True), ()), "data.dataset", BEFORE),
    "output_dir_is_masks_from": (lambda c: (c.with_prune(masks_from=str(c.masks), output_dir=str(c.masks), overwrite=True), ()), "prune.masks_from", BEFORE),
    "checkpoint_dir_in_model": (lambda c: (_with_checkpoint(c, c.config(), c.model / "ckpt"), ()), "CalibrationCheckpoint.dirpath", BEFORE),
    "default_root_dir_in_model": (lambda c: (_root_in(c), ()), "trainer.default_root_dir", BEFORE),
    "overwrite_folder_not_written_by_us": (_case_not_written_by_us, "was not written by sinkprune", BEFORE),
    # --- outputs that cannot be written ------------------------------------------------------------
    "output_dir_read_only": (_prune(output_dir="/sys/sinkprune-test/pruned"), "cannot write in /sys", BEFORE),
    "output_parent_is_file": (_case_output_parent_is_file, "is a file, not a folder", BEFORE),
    "output_dir_is_file": (_case_output_is_file, "evaluate.output_dir", BEFORE),
    "sinks_out_dir_is_file": (_case_sinks_out_is_file, "SinkStatsCallback.output_dir", BEFORE),
    "disk_full": (_case_full_disk, "MiB free", BEFORE),
    # --- field values ------------------------------------------------------------------------------
    "reduction_slots_zero": (_prune(reduction_slots=0), "reduction_slots=0", BEFORE),
    "blocksize_zero": (_prune(blocksize=0), "blocksize=0", BEFORE),
    "percdamp_negative": (_prune(percdamp=-0.1), "percdamp=-0.1", BEFORE),
    "unknown_task": (_prune(tasks=[{"name": "hellaswagg"}]), "'hellaswagg' is not an lm-eval task", BEFORE),
    "masks_from_wrong_shapes": (_case_wrong_mask_shapes, "masks_from", BEFORE),
    "masks_from_unknown_layer": (_case_mask_of_unknown_layer, "names no weight of this model", BEFORE),
    "torch_dtype_typo": (_model(torch_dtype="bfloat61"), "model.torch_dtype='bfloat61'", BEFORE),
    "mask_token_outside_vocab": (_model(mask_token_id=999999), "model.mask_token_id=999999", BEFORE),
    "sparsity_percent_string": (_simple(sparsity="50%"), "sparsity='50%': a profile must be one of owl (or give a number, e.g. 0.5)", BEFORE),
    "heldout_samples_zero": (_data(heldout_samples=0), "data.heldout_samples=0", BEFORE),
    "sink_std_negative": (_sink(sink_std=-5), "sink_std=-5", BEFORE),
    "max_epochs_five": (_args("--trainer.max_epochs", "5"), "trainer.max_epochs=5", BEFORE),
    "devices_three_without_calibration_ddp": (_args("--trainer.devices", "3"), "calibration_ddp", BEFORE),
    "accelerator_gpu_without_cuda": (_args("--trainer.accelerator", "gpu"), "trainer.accelerator", BEFORE),
    "hub_id_typo_offline": (_simple(pretrained="GSAI-ML/LLaDA-8B-Bsae"), "model.pretrained='GSAI-ML/LLaDA-8B-Bsae'", BEFORE),
    "nsamples_far_too_many": (_data(nsamples=200000), "data.nsamples=200000", BEFORE),
    # --- loading errors that used to be tracebacks --------------------------------------------------
    "truncated_weights": (_case_truncated_weights, "model.safetensors is truncated", BEFORE),
    "corrupt_config_json": (_case_corrupt_config, "config.json is not readable JSON", BEFORE),
    "garbage_checkpoint": (_case_garbage_checkpoint, "ckpt_path=", BEFORE),
    "missing_checkpoint": (_args("--ckpt_path", "/no/such/last.ckpt"), "ckpt_path=/no/such/last.ckpt: no such file", BEFORE),
    "binary_txt_dataset": (_case_binary_txt, "is not UTF-8 text (byte offset 10)", BEFORE),
    "malformed_jsonl": (_case_malformed_jsonl, "corpus.jsonl line 2: invalid JSON", BEFORE),
    "jsonl_without_text": (_case_jsonl_without_text, "has no string field 'text'", BEFORE),
    "malformed_json_array": (_case_malformed_json_array, "corpus.json line 2: invalid JSON", BEFORE),
    "yaml_syntax_error": (_case_yaml_syntax, "bad.yaml line 3", BEFORE),
    "yaml_not_text": (_case_binary_yaml, "bad.yaml: not UTF-8 text", BEFORE),
    "config_file_missing": (_case_missing_config, "no_such.yaml: no such file", BEFORE),
    "truncated_masks_from": (_case_truncated_masks, "masks.safetensors is truncated", BEFORE),
    # --- a tired user at 2 a.m. ------------------------------------------------------------------------
    "chunk_size_zero": (_sink(chunk_size=0), "chunk_size=0", BEFORE),
    "sink_alpha_zero": (_sink(sink_alpha=0), "sink_alpha=0", BEFORE),
    "targets_bad_regex": (_prune(targets=["q_proj("]), "targets: 'q_proj(' is not a valid regular expression", BEFORE),
    "ignore_bad_regex": (_prune(ignore=["*out"]), "ignore: '*out' is not a valid regular expression", BEFORE),
    "mode_typo": (_prune(mode="sequental"), "mode='sequental' is unknown", BEFORE),
    "method_typo": (_simple(method="sink_wandaa"), "method='sink_wandaa' is unknown", BEFORE),
    "n_m_typo": (_simple(method="wanda", n_m="2/4"), "not of the form 'N:M'", BEFORE),
    "sparsity_one": (_simple(sparsity=1.0), "sparsity=1.0 must be in [0, 1)", BEFORE),
    "seqlen_one": (_data(seqlen=1), "data.seqlen=1 must be >= 2", BEFORE),
    "batch_size_zero": (_data(batch_size=0), "data.batch_size=0 must be >= 1", BEFORE),
    "timesteps_empty": (_model(timesteps=[]), "model.timesteps=[]", BEFORE),
    "eps_above_one": (_model(eps=1.5), "model.eps=1.5", BEFORE),
    "heldout_timesteps_zero": (_model(heldout_timesteps=0), "model.heldout_timesteps=0", BEFORE),
    "checkpoint_every_zero": (lambda c: (_ckpt_every(c, 0), ()), "every_n_batches=0", BEFORE),
    "dataset_is_directory": (lambda c: (c.config(data_args={"dataset": str(c.tmp / "inputs")}), ()), "data.dataset", BEFORE),
    "dataset_missing_file": (_data(dataset="./no/such/corpus.txt"), "neither a file nor a known source", BEFORE),
    "unknown_sink_option": (_sink(sink_sdt=2.0), "sink_sdt", BEFORE),
    "seqlen_above_model_max": (_data(seqlen=4096), "exceeds the model's maximum sequence length 512", BEFORE),
    "task_spec_without_name": (_prune(tasks=[{"nmae": "wiki_cloze_offline"}]), "needs `name`", BEFORE),
}


def _sink_cb_set(config, **kw):
    _sink_cb(config).update(kw)
    return config


def _root_in(c: Ctx) -> dict:
    config = c.config()
    config["trainer"]["default_root_dir"] = str(c.model / "runs")
    return config


def _ckpt_every(c: Ctx, n: int) -> dict:
    config = _with_checkpoint(c, c.config(), c.tmp / "ckpt")
    config["trainer"]["callbacks"][-1]["init_args"]["every_n_batches"] = n
    return config


@pytest.fixture
def load_spy(monkeypatch):
    calls = []
    real = pipeline.model.module.load_dlm

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.model.module, "load_dlm", spy)
    return calls


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("name", sorted(CASES))
def test_mistake_is_refused_early_and_cleanly(name, tmp_path, load_spy, monkeypatch):
    build, message, latest = CASES[name]
    c = Ctx(tmp_path)
    config, extra = build(c, monkeypatch) if name == "disk_full" else build(c)
    before = {str(p): digest(p) for p in c.inputs}
    outside = _tree(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    if config is None:  # the config file itself is the mistake
        code, err = _run_args(list(extra))
    else:
        code, err = run_inprocess(config, tmp_path, *extra)
    elapsed = time.time() - start
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert elapsed < 30, f"took {elapsed:.0f} s to refuse"
    if latest == BEFORE:
        assert not load_spy, f"the model was loaded before refusing: {errors[0]}"
    assert {str(p): digest(p) for p in c.inputs} == before, "an input changed"
    left = _tree(tmp_path) - outside - {"config.yaml"}
    assert not any(part.startswith((".", "pruned", "sinks")) or "/pruned" in part or "/sinks" in part for part in left), left


def _run_args(args: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    import cli

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main(["fit", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def test_overwrite_replaces_a_folder_sinkprune_wrote(tmp_path):
    """overwrite: true does replace a previous run's own output (it carries the marker)."""
    c = Ctx(tmp_path)
    config = c.config(pretrained="minilm-dlm", data_args={}, nsamples=2, timesteps=1)
    config["trainer"]["callbacks"][-1]["init_args"]["save_model"] = False
    _prune_cb(config)["score_dense"] = False
    _prune_cb(config)["score"] = False
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-2000:]
    first = json.loads((c.root / "pruned" / "results.json").read_text())
    assert (c.root / "pruned" / ".sinkprune-output").is_file()
    _prune_cb(config)["overwrite"] = True
    _sink_cb(config)["overwrite"] = True
    code, err = run_inprocess(config, tmp_path)
    assert code == 0, err[-2000:]
    assert json.loads((c.root / "pruned" / "results.json").read_text())["sparsity_report"] == first["sparsity_report"]
