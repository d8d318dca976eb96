"""Export 2:4-pruned nn.Linear weights to PyTorch's semi-structured sparse format for sparse tensor cores.

    from pipeline.maths.semi_structured import export_semi_structured
    model = model.cuda().to(torch.bfloat16)
    report = export_semi_structured(model)          # every exactly-2:4 Linear -> to_sparse_semi_structured

Pruning with n_m=(2, 4) leaves dense weights with 2 zeros in every 4 consecutive inputs; only after this
export do matmuls run on the 2:4 kernels (cuSPARSELt, or CUTLASS when
SparseSemiStructuredTensor._FORCE_CUTLASS is set).  Those kernels need an Ampere-or-newer GPU
(compute capability >= 8.0) and fp16/bf16 weights, so that is checked before anything is touched.
The export is for inference: converted weights have requires_grad=False.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def _groups_over_2_of_4(weight: torch.Tensor) -> int:
    """How many groups of 4 consecutive inputs hold more than 2 nonzeros (0 = valid 2:4)."""
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return int((nonzero > 2).sum())


def check_2_4(weight: torch.Tensor) -> bool:
    """True if the [out, in] weight has at most 2 nonzeros in every group of 4 consecutive inputs.

    Works on any device and dtype.  More zeros than 2 per group (dead inputs) is still valid 2:4.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return _groups_over_2_of_4(weight) == 0


def _backend_class():
    from torch.sparse import SparseSemiStructuredTensor

    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUTLASS if forced else torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _shape_problem(weight: torch.Tensor) -> str | None:
    """Why the backend's kernels cannot take this weight shape, or None (limits read from torch's own table)."""
    constraints = getattr(_backend_class(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    min_rows, min_cols = (constraints.sparse_min_rows, constraints.sparse_min_cols) if constraints else (64, 64)
    rows, cols = weight.shape
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return f"shape {rows}x{cols} is not a multiple of the kernel tile {min_rows}x{min_cols}"
    return None


def _check_device_and_dtype(name: str, weight: torch.Tensor) -> None:
    if not weight.is_cuda:
        raise RuntimeError(
            f"2:4 semi-structured export needs CUDA weights on a GPU with compute capability >= 8.0, but {name} is on "
            f"{weight.device}; move the model to an Ampere/Hopper GPU first (model.cuda()) or keep the dense 2:4-masked weights"
        )
    capability = torch.cuda.get_device_capability(weight.device)
    if capability < MIN_CAPABILITY:
        raise RuntimeError(
            f"2:4 semi-structured export needs compute capability >= 8.0 (Ampere/Hopper), but {weight.device} has "
            f"{capability[0]}.{capability[1]}; run on a newer GPU or keep the dense 2:4-masked weights"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"2:4 semi-structured export needs fp16/bf16 weights, but {name} is {weight.dtype}; "
            "cast first with model.to(torch.bfloat16) or model.half()"
        )


def export_semi_structured(model: nn.Module, module_filter: Callable[[str, nn.Module], bool] | None = None) -> dict:
    """Replace the weight of every exactly-2:4 nn.Linear (passing module_filter(name, module)) in place.

    Returns {"converted": [names], "skipped": {name: reason}, "backend": "cusparselt" | "cutlass",
    "converted_params": int}.  Linears that are not 2:4, have a shape the kernels cannot take, or share
    their weight with another module (tied embeddings) are skipped and reported, not converted.
    """
    from torch.sparse import to_sparse_semi_structured

    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and (module_filter is None or module_filter(name, module))]
    # All checks that can fail come first, so a failing export leaves the model untouched.
    for name, module in candidates:
        _check_device_and_dtype(name or "<root>", module.weight)

    uses = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1

    backend = _backend_class()
    report = {"converted": [], "skipped": {}, "backend": getattr(backend, "BACKEND", backend.__name__), "converted_params": 0}
    for name, module in candidates:
        weight = module.weight
        if not check_2_4(weight):
            report["skipped"][name] = (f"not 2:4 sparse ({_groups_over_2_of_4(weight)} groups of 4 have > 2 nonzeros)"
                                       if weight.shape[1] % 4 == 0 else f"in_features={weight.shape[1]} not divisible by 4")
            continue
        if uses.get(id(weight), 1) > 1:
            report["skipped"][name] = "weight is shared with another module (tied); converting would untie it"
            continue
        problem = _shape_problem(weight)
        if problem:
            report["skipped"][name] = problem
            continue
        sparse = to_sparse_semi_structured(weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        report["converted"].append(name)
        report["converted_params"] += weight.numel()
    return report
