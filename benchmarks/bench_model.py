"""The model a calibration benchmark runs on: torch's thread count set, the model, its mask id, its pruned layers."""
from __future__ import annotations

import torch

from pipeline.model.calibration import target_linears
from pipeline.model.loading import load_dlm, resolve_mask_token_id


def load_for_calibration(name: str, threads: int):
    """Returns (model in eval mode, tokenizer, mask token id, {name: Linear} of the layers PruneCallback targets)."""
    torch.set_num_threads(threads)
    model, tokenizer = load_dlm(name)
    return model, tokenizer, resolve_mask_token_id(tokenizer, model.config), target_linears(model)
