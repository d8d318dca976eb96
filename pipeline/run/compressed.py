"""Saving a quantized model in the compressed-tensors format, with the compressed-tensors library itself.

The layers already hold their dequantized weights (codes · scale, pipeline/maths/quantize.py); here each is given the
library's quantization scheme and its scales, `ModelCompressor` packs them (int4: pack-quantized, int32 words with the
scales; FP8: float-quantized, float8_e4m3fn weights with per-channel scales), `save_pretrained` writes the folder and
`update_config` adds the quantization config to config.json.  The model is decompressed again afterwards with the same
library (the very operation a loader runs), so it keeps computing with the same bits.  compressed-tensors is imported
only here and only when a quantized model is saved (the `quantize` extra).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.maths.quantize import Scheme


def require_compressed_tensors(field: str = "quantize") -> None:
    """Before any work: the library that writes the format is installed."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ImportError(f"{field}: saving a quantized model needs compressed-tensors; pip install 'sinkprune[quantize]' "
                          "(or pip install compressed-tensors), or set save_model: false") from None


def quantization_config(model: torch.nn.Module, modules: list[torch.nn.Module], scheme: Scheme):
    """compressed-tensors' QuantizationConfig: every Linear, except the model's other Linear layers (listed in ignore)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if scheme.is_float:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
    else:
        strategy = "channel" if scheme.group_size is None else "group"
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy, group_size=scheme.group_size,
                                dynamic=False, actorder="weight" if scheme.actorder else None)
    chosen = {id(m) for m in modules}  # by identity: a module shared by two parents has two names
    ignore = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in chosen]
    group = QuantizationScheme(targets=["Linear"], weights=args, format=format_name(scheme))
    return QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, quantization_status="frozen",
                              format=format_name(scheme))


def format_name(scheme: Scheme) -> str:
    return "float-quantized" if scheme.is_float else "pack-quantized"


def tied_twins(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """{other module: quantized layer} for the modules holding a quantized layer's weight Parameter under another
    name (DiffusionGemma's encoder layers share their weights with the decoder's)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            holders.setdefault(id(weight), []).append(name)
    twins = {}
    for name in names:
        module = model.get_submodule(name)
        for other in holders.get(id(module.weight), []):
            if other != name and model.get_submodule(other) is not module:
                twins.setdefault(other, name)
    return twins


def save_compressed(model: torch.nn.Module, directory: Path, scales: dict[str, torch.Tensor], scheme: Scheme) -> None:
    """model.save_pretrained(directory) in the compressed-tensors format; the model is left as it was.  Runs on one
    rank (the library's own distributed compression would wait for the others: `as_single_threaded`).

    A layer whose weight another module shares (tied twins) is packed under both names with the same scales, and
    the checkpoint is saved untied (`tie_word_embeddings: false`, every shared tensor written once per name):
    transformers re-ties weights by name when it loads, which a packed layer (`weight_packed`, no `weight`) cannot
    take, so a tied quantized checkpoint would not load."""
    from compressed_tensors.compressors import ModelCompressor, decompress_module
    from compressed_tensors.offload import as_single_threaded
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    twins = tied_twins(model, list(scales))
    owner = {**{n: n for n in scales}, **twins}                     # module name -> the layer whose scales it takes
    modules = {name: model.get_submodule(name) for name in owner}
    weights = {name: module.weight for name, module in modules.items()}  # the Parameters, re-tied afterwards
    config = quantization_config(model, list(modules.values()), scheme)
    with as_single_threaded(), _quiet_progress(), _untied_config(model, bool(twins)):
        apply_quantization_config(model, config, show_progress=False)
        try:
            with torch.no_grad():
                for name, module in modules.items():
                    scale = scales[owner[name]]
                    module.weight_scale.data = scale.to(module.weight.device, module.weight.dtype).reshape(module.weight_scale.shape)
            compressor = ModelCompressor.from_pretrained_model(model)
            compressor.compress_model(model)
            state = _unshared_state_dict(model) if twins else None
            model.save_pretrained(directory, safe_serialization=True, state_dict=state)
            compressor.update_config(str(directory))
        finally:  # back to plain Linear layers holding the same dequantized weights (tied as before)
            for module in model.modules():
                if getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
                    decompress_module(module, leave_decompressed=False)
                elif getattr(module, "quantization_scheme", None) is not None:
                    _clear_quantization(module)
            for name, module in modules.items():
                module.weight = weights[name]
            if hasattr(model, "ct_decompress_hook"):
                model.ct_decompress_hook.remove()
                delattr(model, "ct_decompress_hook")


@contextmanager
def _untied_config(model: torch.nn.Module, untie: bool):
    """While saving: `tie_word_embeddings: false` in the model's config and its text config (what config.json gets)."""
    configs = {id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: model.config)())}
    previous = {key: getattr(c, "tie_word_embeddings", None) for key, c in configs.items()} if untie else {}
    for key in previous:
        configs[key].tie_word_embeddings = False
    try:
        yield
    finally:
        for key, value in previous.items():
            configs[key].tie_word_embeddings = value


def _unshared_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor that shares storage with an earlier one cloned, so that save_pretrained
    writes each name (it would otherwise drop the copies it knows as tied)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        state[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return state


def _clear_quantization(module) -> None:
    from compressed_tensors.quantization import QuantizationMetadata

    QuantizationMetadata.clear_quantization(module)
    if hasattr(module, "quantization_status"):
        delattr(module, "quantization_status")


@contextmanager
def _quiet_progress():
    """The library's tqdm bars off (the run's own console reports the saving step)."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
