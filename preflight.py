"""Preflight: every check a run's inputs allow, before the model's weights load.

`check_run` is called by the CLI once the config is parsed and the objects exist (nothing loaded yet).
It reads only small files (config.json, safetensors headers, a checkpoint of megabytes), never weights.
Every failure is one line naming the field, the problem and the fix:
  * outputs: no output equals, contains or lies inside an input (model folder, dataset file, masks_from,
    resume checkpoint); each output's folder accepts a new file, no path component is a file, and the
    disk has room for the weights and masks; existing outputs are refused unless sinkprune wrote them;
  * inputs: weights files are whole (safetensors header vs size), masks_from names and shapes match the
    model's weights, mask_token_id fits the vocabulary, lm-eval task names exist, the checkpoint loads;
  * trainer: the calibration owns the epoch count, several devices need a calibration_ddp strategy, a
    GPU accelerator needs CUDA;
  * contracts: every `check_contracts` of the module and the callbacks (pipeline/run/protocols.py), the probe's
    attention, and PruneCallback's targets / n_m and QuantizeCallback's group size on the model's skeleton (its
    modules built on the meta device from config.json).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from pipeline.maths.diffusion import check_window
from pipeline.model.loading import check_mask_id
from pipeline.run.protocols import check_contracts
from pipeline.run.outputs import check_not_input, check_writable, prepare_output_dir

# --- small readers --------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict:
    """The tensor table of a .safetensors file, after checking the file holds every byte it declares."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated at byte {size}: not a safetensors file; re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path} is truncated or corrupt: its header claims {n} bytes, the file has {size}; re-download or re-save it")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: unreadable safetensors header (bytes 8-{8 + n}); re-download or re-save it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its tensors end at byte {8 + n + end}, the file stops at byte {size}; "
                         "re-download or re-save it")
    return header


def model_weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def weight_table(folder: Path) -> dict[str, dict]:
    """name -> {dtype, shape} over every safetensors shard of a model folder (checked whole)."""
    table = {}
    for f in sorted(folder.glob("*.safetensors")):
        table.update(safetensors_header(f))
    return table


def local_model_folder(pretrained: str) -> Path | None:
    """The folder a model loads from, when it is on this machine (local path, embedded, or the hub cache)."""
    from pipeline.model.loading import resolve_path

    path = Path(resolve_path(pretrained))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "config.json")
    except Exception:  # a malformed id: the hub check below names it
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_hub_id(pretrained: str) -> None:
    """A hub id that is not cached: offline, refuse now; online, ask the hub once (no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(f"model.pretrained={pretrained!r} is neither a local folder nor in the Hugging Face cache, and "
                                "HF_HUB_OFFLINE is set; check the id, download it first, or unset HF_HUB_OFFLINE")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(pretrained, timeout=10)
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"model.pretrained={pretrained!r}: no such model on the Hugging Face hub (or it is private); "
                                "check the id or run `huggingface-cli login`") from None
    except Exception as exc:  # no network, proxy, timeout
        raise ConnectionError(f"model.pretrained={pretrained!r} is not in the local cache and the hub cannot be reached "
                              f"({type(exc).__name__}); check the network or set HF_HUB_OFFLINE=1 with a cached model") from None


# --- the run's inputs and outputs ----------------------------------------------------------------
def run_inputs(module, datamodule, prune, ckpt_path) -> dict[str, Path]:
    inputs: dict[str, Path] = {}
    folder = local_model_folder(module.hparams.pretrained)
    if folder is not None:
        inputs["model.pretrained"] = folder
    dataset = getattr(getattr(datamodule, "hparams", None), "dataset", None)
    if dataset and Path(dataset.split(",")[0]).expanduser().exists():
        for i, p in enumerate(dataset.split(",")):
            inputs["data.dataset" if i == 0 else f"data.dataset[{i}]"] = Path(p).expanduser()
    if prune is not None and prune.masks_from:
        inputs["prune.masks_from"] = Path(prune.masks_from).expanduser()
    if ckpt_path:
        inputs["ckpt_path"] = Path(ckpt_path).expanduser()
    return inputs


def run_outputs(trainer) -> list[tuple[str, Path, bool]]:
    """(field, folder, overwrite) for the result folders a run writes (a failed run removes them)."""
    from callbacks.evaluate import EvaluateExportCallback
    from callbacks.prune import PruneCallback
    from callbacks.sink_stats import SinkStatsCallback

    pruning = any(isinstance(cb, PruneCallback) for cb in trainer.callbacks)
    outs = []
    for cb in trainer.callbacks:
        if isinstance(cb, EvaluateExportCallback) and pruning:
            outs.append(("evaluate.output_dir", cb.output_path(trainer), cb.overwrite))
        elif isinstance(cb, SinkStatsCallback) and cb.record:
            outs.append(("SinkStatsCallback.output_dir", cb.output_path(trainer), cb.overwrite))
    return outs


def holds_results(callbacks, folder) -> bool:
    """Whether a previous run's results fill a result folder this run would write under `folder` as its run
    folder (a default location, not an explicit output_dir) and overwrite does not cover it: the run then goes
    to a fresh version folder (outputs.run_folder)."""
    from types import SimpleNamespace

    def outputs(root):
        return run_outputs(SimpleNamespace(default_root_dir=str(root), callbacks=callbacks))

    here, elsewhere = outputs(folder), outputs(Path(folder) / "elsewhere")
    return any(path != moved and not overwrite and path.is_dir() and any(path.iterdir())
               for (_, path, overwrite), (_, moved, _) in zip(here, elsewhere))


def check_checkpoint_dirs(trainer, inputs: dict[str, Path]) -> None:
    """CalibrationCheckpoint folders: outside every input, writable.  The one input they may hold is the
    resume checkpoint itself, which the resumed run replaces (atomically) with its own later state."""
    from callbacks.checkpoint import CalibrationCheckpoint

    others = {k: v for k, v in inputs.items() if k != "ckpt_path"}
    for cb in trainer.callbacks:
        if isinstance(cb, CalibrationCheckpoint):
            folder = cb.folder(trainer)
            check_not_input("CalibrationCheckpoint.dirpath", folder, others)
            if "ckpt_path" in inputs and folder.resolve() != inputs["ckpt_path"].resolve().parent:
                check_not_input("CalibrationCheckpoint.dirpath", folder, {"ckpt_path": inputs["ckpt_path"]})
            check_writable("CalibrationCheckpoint.dirpath", folder)


def output_bytes(folder: Path | None, save_model: bool) -> int:
    """Weights (when saved) + one byte per weight for the masks; 0 when the weights are not local."""
    if folder is None:
        return 0
    total = sum(f.stat().st_size for f in model_weight_files(folder))
    return total + total // 2 if save_model else total // 2


# --- field checks that need the model's config or files ------------------------------------------
def check_model_files(module, datamodule, folder: Path | None) -> dict | None:
    """Config, weights integrity, mask id vs vocabulary; returns the weight table (None when not local)."""
    hp = module.hparams
    if folder is None:
        check_hub_id(hp.pretrained)
        return None
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model.pretrained: {config_file} is not readable JSON ({exc}); repair or re-download it") from None
    table = weight_table(folder)
    seqlen = getattr(getattr(datamodule, "hparams", None), "seqlen", None)
    check_window(seqlen, config)
    check_mask_id(hp.mask_token_id, config.get("vocab_size") or config.get("embedding_size"))
    return table


def check_probe_sees_attention(module, trainer, folder: Path | None) -> None:
    """SinkStatsCallback's probe sees scaled_dot_product_attention only: an attention the config names as another
    is refused here (a model that picks its own, remote code, is checked by the probe once it has loaded)."""
    from callbacks.sink_stats import SinkStatsCallback
    from pipeline.maths.attention import UNPROBED_ATTENTION

    impl = module.hparams.attn_implementation
    if folder is None or impl not in UNPROBED_ATTENTION or not any(isinstance(cb, SinkStatsCallback) for cb in trainer.callbacks):
        return
    if json.loads((folder / "config.json").read_text()).get("auto_map"):
        return  # remote code picks its own attention (pipeline/model/loading.py)
    raise ValueError(f"model.attn_implementation={impl!r}: SinkStatsCallback's probe sees only "
                     "torch.nn.functional.scaled_dot_product_attention; use attn_implementation: sdpa")


def check_layers(module, trainer, prune, folder: Path | None) -> None:
    """PruneCallback's targets, ignore and n_m, and QuantizeCallback's group size, against the model's layers, on its
    skeleton (meta device, no weights)."""
    if prune is None or folder is None:
        return
    from callbacks.quantize import QuantizeCallback
    from pipeline.model.fused_experts import is_fused_experts
    from pipeline.model.loading import model_skeleton

    hp = module.hparams
    try:
        skeleton = model_skeleton(hp.pretrained, trust_remote_code=hp.trust_remote_code, model_class=hp.model_class)
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device: PruneCallback checks it once loaded
        return
    if any(is_fused_experts(m) for m in skeleton.modules()):
        return  # its experts become Linear layers only once loaded (unfused from the weights): checked then
    pruned = prune.find_layers(skeleton).layers
    for cb in trainer.callbacks:
        if isinstance(cb, QuantizeCallback):
            cb.quantized_layers(skeleton, pruned)


def check_masks_from(prune, table: dict | None) -> None:
    """Every saved mask must name a weight of the model and have its shape (headers only)."""
    if prune is None or not prune.masks_from:
        return
    masks = safetensors_header(Path(prune.masks_from).expanduser() / "masks.safetensors")  # (there: PruneCallback checked)
    if table is None:
        return
    for name, entry in masks.items():
        weight = table.get(f"{name}.weight")
        if weight is None:
            raise ValueError(f"prune masks_from={prune.masks_from}: the mask {name} names no weight of this model; "
                             "was it saved from another model?")
        if list(weight["shape"]) != list(entry["shape"]):
            raise ValueError(f"prune masks_from={prune.masks_from}: the mask of {name} is {tuple(entry['shape'])} but the "
                             f"model's weight is {tuple(weight['shape'])}; was it saved from another model?")


def check_tasks(evaluate) -> None:
    if evaluate is None or not evaluate.tasks:
        return
    from pipeline.evaluation.scoring import DEFAULT_TASK_DIR, normalize_spec, task_manager_for

    specs = [normalize_spec(t) for t in evaluate.tasks]
    include = evaluate.eval_kwargs.get("include_path", DEFAULT_TASK_DIR)
    names = [s["name"] for s in specs]
    known = task_manager_for(names, include).all_tasks
    for name in names:
        if name not in known:
            from difflib import get_close_matches

            near = get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(near)}?" if near else f"see `lm_eval --tasks list` or add a YAML to {include}"
            raise ValueError(f"evaluate tasks: {name!r} is not an lm-eval task; {hint}")


def check_checkpoint(ckpt_path) -> None:
    if not ckpt_path:
        return
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file; give a CalibrationCheckpoint's last.ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"ckpt_path={ckpt_path} is not a readable checkpoint ({type(exc).__name__}); "
                         "give a CalibrationCheckpoint's last.ckpt, or drop --ckpt_path to start afresh") from None
    if not isinstance(state, dict) or "callbacks" not in state:
        raise ValueError(f"ckpt_path={ckpt_path} is not a Lightning checkpoint; give a CalibrationCheckpoint's last.ckpt")


def check_trainer(trainer, max_epochs) -> None:
    if max_epochs not in (None, 1):
        raise ValueError(f"trainer.max_epochs={max_epochs}: calibration is one epoch (PruneCallback mode: sequential "
                         "sets its own count); remove trainer.max_epochs")
    strategy = type(trainer.strategy).__name__
    if trainer.world_size > 1 and "CalibrationDDP" not in strategy and trainer.num_devices > 1:
        raise ValueError(f"trainer.devices={trainer.num_devices} with strategy {strategy}: calibration has no gradients, "
                         "so torch's DDP refuses it; add --trainer.strategy calibration_ddp (or calibration_ddp_spawn)")


def check_heldout(datamodule, evaluate) -> None:
    scoring = evaluate is not None and (evaluate.score_dense or evaluate.score)
    held = getattr(getattr(datamodule, "hparams", None), "heldout_samples", 1)
    if scoring and held < 1:
        raise ValueError(f"data.heldout_samples={held}: held-out scoring is on, so it needs >= 1 window; "
                         "raise it (default 32) or set evaluate score_dense: false and score: false")


def check_run(module, datamodule, trainer, ckpt_path=None, max_epochs=None) -> list[tuple[str, Path, bool]]:
    """All checks, in order of cost; returns the result folders as (field, folder, existed before)."""
    from callbacks.evaluate import EvaluateExportCallback
    from callbacks.prune import PruneCallback

    prune = next((cb for cb in trainer.callbacks if isinstance(cb, PruneCallback)), None)
    evaluate = next((cb for cb in trainer.callbacks if isinstance(cb, EvaluateExportCallback)), None)
    check_trainer(trainer, max_epochs)
    check_contracts(trainer, module)
    check_heldout(datamodule, evaluate)
    folder = local_model_folder(module.hparams.pretrained)
    inputs = run_inputs(module, datamodule, prune, ckpt_path)
    outputs = run_outputs(trainer)
    needed = output_bytes(folder, evaluate is not None and evaluate.save_model)
    for field, path, overwrite in outputs:
        check_not_input(field, path, inputs)
        prepare_output_dir(path, overwrite, field)
        check_writable(field, path, needed if field == "evaluate.output_dir" else 0)
    check_checkpoint_dirs(trainer, inputs)
    check_not_input("trainer.default_root_dir", trainer.default_root_dir, inputs, contains_ok=True)
    table = check_model_files(module, datamodule, folder)
    check_probe_sees_attention(module, trainer, folder)
    check_layers(module, trainer, prune, folder)
    check_masks_from(prune, table)
    check_checkpoint(ckpt_path)
    check_tasks(evaluate)
    return [(field, path, path.exists()) for field, path, _ in outputs]
