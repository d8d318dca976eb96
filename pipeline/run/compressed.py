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


def quantization_config(model: torch.nn.Module, layers: list[str], scheme: Scheme):
    """compressed-tensors' QuantizationConfig: every Linear, except the model's other Linear layers (listed in ignore)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    if scheme.is_float:
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
    else:
        strategy = "channel" if scheme.group_size is None else "group"
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy, group_size=scheme.group_size,
                                dynamic=False, actorder="weight" if scheme.actorder else None)
    chosen = {id(model.get_submodule(name)) for name in layers}  # by identity: a tied layer has two names
    ignore = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in chosen]
    group = QuantizationScheme(targets=["Linear"], weights=args, format=format_name(scheme))
    return QuantizationConfig(config_groups={"group_0": group}, ignore=ignore, quantization_status="frozen",
                              format=format_name(scheme))


def format_name(scheme: Scheme) -> str:
    return "float-quantized" if scheme.is_float else "pack-quantized"


def save_compressed(model: torch.nn.Module, directory: Path, scales: dict[str, torch.Tensor], scheme: Scheme) -> None:
    """model.save_pretrained(directory) in the compressed-tensors format; the model is left as it was.  Runs on one
    rank (the library's own distributed compression would wait for the others: `as_single_threaded`)."""
    from compressed_tensors.compressors import ModelCompressor, decompress_module
    from compressed_tensors.offload import as_single_threaded
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    config = quantization_config(model, list(scales), scheme)
    modules = {name: model.get_submodule(name) for name in scales}  # (a layer tied into two places: its own name)
    with as_single_threaded(), _quiet_progress():
        apply_quantization_config(model, config, show_progress=False)
        try:
            with torch.no_grad():
                for name, scale in scales.items():
                    module = modules[name]
                    module.weight_scale.data = scale.to(module.weight.device, module.weight.dtype).reshape(module.weight_scale.shape)
            compressor = ModelCompressor.from_pretrained_model(model)
            compressor.compress_model(model)
            model.save_pretrained(directory, safe_serialization=True)
            compressor.update_config(str(directory))
        finally:  # back to plain Linear layers holding the same dequantized weights
            for module in model.modules():
                if getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
                    decompress_module(module, leave_decompressed=False)
                elif getattr(module, "quantization_scheme", None) is not None:
                    _clear_quantization(module)
            if hasattr(model, "ct_decompress_hook"):
                model.ct_decompress_hook.remove()
                delattr(model, "ct_decompress_hook")


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
