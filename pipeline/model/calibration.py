"""Calibration: how a calibrating LightningModule hands noised batches to the callbacks, and the noising.

A module that wants `SinkStatsCallback` and `PruneCallback` provides (`CalibrationModule`, declared with the
callbacks' own protocols in pipeline/run/protocols.py):
  * `model`              the network; `calibration_forward(input_ids, attention_mask)` runs it (by default
                         `model(input_ids=..., attention_mask=...)`);
  * `mask_token_id`      the id the forward process writes;
  * in `training_step`,  for every noised version of the batch, `dispatch_noised_batch(trainer, self, nb)`.
    `noised_batches(...)` builds those NoisedBatch objects with rank-independent noise.

Dispatch has two phases so that sink scores exist before activations are weighted:
  1. `on_noised_batch_start(trainer, module, nb)`: SinkStatsCallback runs a probed forward and sets
     `nb.sink_scores` [B, L];
  2. `on_noised_batch(trainer, module, nb)`: PruneCallback runs a hooked forward that reads them.

Both forwards stop after the last transformer block (`forward_through_blocks`): sink scores need every
layer's attention and the statistics need the blocks' Linear inputs, but nothing needs the LM head's
logits over the vocabulary (on a small model that head is most of the forward's cost).  A callback that reads
activations off the probed forward (PruneCallback's single pass) says so through `SinkScoreConsumer`
(`reads_probed_forward(epoch)`).  When no consumer reads them, the probed forward stops at the last attention
call (the last block's attention output and MLP never run).
"""
from __future__ import annotations

import torch

from pipeline.maths.attention import AllAttentionSeen
from pipeline.model.loading import dlm_forward
from pipeline.run.protocols import CalibrationForward, NoisedBatch, NoisedBatchHooks
from pipeline.maths.diffusion import DEFAULT_EPS, forward_process, noise_seed, per_sample_tokens, per_sample_uniform, token_seed


def noised_batches(batch: dict, timesteps: list[float], mask_token_id: int, *, seed: int, eps: float = DEFAULT_EPS,
                   noise: str = "mask", vocab_size: int | None = None):
    """Yield one NoisedBatch per timestep; noise depends only on (seed, sample index, step).
    noise="uniform" replaces noised positions by random tokens of [0, vocab_size) (seeded the same way)."""
    x0 = batch["input_ids"]
    keep = batch.get("keep")
    sample_ids = [int(i) for i in batch["index"]]
    for step, t in enumerate(timesteps):
        seeds = [noise_seed(seed, i, step) for i in sample_ids]
        uniform = per_sample_uniform(tuple(x0.shape), seeds)
        replacement = per_sample_tokens(tuple(x0.shape), [token_seed(s) for s in seeds], vocab_size) if noise == "uniform" else None
        noisy, masked, _ = forward_process(x0, t, mask_token_id, eps=eps, keep=keep, uniform=uniform, noise=noise,
                                           vocab_size=vocab_size, replacement=replacement)
        yield NoisedBatch(noisy, x0, masked, float(t), step, sample_ids, batch.get("attention_mask"))


def reference_noised_batches(batch: dict, timesteps: list[float], mask_token_id: int, generator: torch.Generator,
                             *, eps: float = DEFAULT_EPS):
    """The reference's noise order: one [B, L] uniform draw per timestep, in order, from ONE generator that the
    caller seeds once (`torch.Generator().manual_seed(seed)`, the stream `torch.manual_seed(seed)` gives the
    reference's CPU runs) and draws from across batches in window order; masked where u < (1 − eps)·t + eps
    (computed in double, as the reference's Python float).  Bit-identical to the reference's masks only in a single
    process with batch size 1, unshuffled windows and no resume; `keep` is ignored (the reference keeps nothing)."""
    x0 = batch["input_ids"]
    sample_ids = [int(i) for i in batch["index"]]
    for step, t in enumerate(timesteps):
        uniform = torch.rand(tuple(x0.shape), generator=generator).to(x0.device)
        masked = uniform < ((1.0 - eps) * float(t) + eps)
        noisy = torch.where(masked, torch.full_like(x0, mask_token_id), x0)
        yield NoisedBatch(noisy, x0, masked, float(t), step, sample_ids, batch.get("attention_mask"))


def mask_window(module, length: int = 8) -> torch.Tensor:
    """[1, length] mask tokens on the model's device: the short forward the callbacks run at fit start to learn the
    model's structure (attention calls, block arguments, shared layer inputs)."""
    device = next(module.model.parameters()).device
    return torch.full((1, length), int(module.mask_token_id), dtype=torch.long, device=device)


def calibration_forward(module, input_ids, attention_mask=None):
    """The module's `calibration_forward` if it has one, else `loading.dlm_forward(module.model, ...)`."""
    if isinstance(module, CalibrationForward):
        return module.calibration_forward(input_ids, attention_mask)
    return dlm_forward(module.model, input_ids, attention_mask)


def _holds_linear(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Linear) for m in module.modules())


def _declared_layer_classes(model) -> set[str]:
    """Class names that Hugging Face models declare as their unsplittable layers (`_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def find_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The transformer blocks, as [(full name, block)], in order.

    1. A ModuleList whose children are all instances of a layer class the model declares in
       `_no_split_modules` (LLaDA: LLaDALlamaBlock, BERT: BertLayer); the longest such list.
    2. Otherwise the longest ModuleList whose children hold nn.Linear layers, among the outermost ones
       only: a list nested inside another candidate's child (an MoE block's `experts`) is never a block
       list, however many experts there are."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    declared = _declared_layer_classes(model)
    candidates = [(name, m) for name, m in lists if declared and all(type(c).__name__ in declared for c in m)]
    if not candidates:
        structural = [(name, m) for name, m in lists if all(_holds_linear(c) for c in m)]
        # "a.b.3.experts" is nested in candidate "a.b"'s child "a.b.3"
        candidates = [(name, m) for name, m in structural
                      if not any(name.startswith(f"{other}.") for other, _ in structural if other != name)]
    best: list[tuple[str, torch.nn.Module]] = []
    for name, module in candidates:
        if len(module) > len(best):
            prefix = f"{name}." if name else ""
            best = [(f"{prefix}{i}", child) for i, child in enumerate(module)]
    return best


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the transformer blocks, by full module name (embeddings and LM head excluded)."""
    return {f"{prefix}.{sub}": m for prefix, block in find_blocks(model) for sub, m in block.named_modules()
            if isinstance(m, torch.nn.Linear)}


class StopForward(Exception):
    """Raised by a forward hook once the part of the network a calibration pass needs has run."""


def _stop(module, inputs, output):
    raise StopForward()


def last_block(model) -> torch.nn.Module | None:
    blocks = find_blocks(model)
    return blocks[-1][1] if blocks else None


def forward_through_blocks(module, input_ids, attention_mask=None, stop_after: torch.nn.Module | None = None) -> None:
    """calibration_forward, cut short after `stop_after` (e.g. `last_block(model)`, found once per run;
    None runs the whole forward) or at a probe's last attention call (AttentionMassProbe(last_call=...))."""
    handle = stop_after.register_forward_hook(_stop) if stop_after is not None else None
    try:
        calibration_forward(module, input_ids, attention_mask)
    except (StopForward, AllAttentionSeen):
        pass
    finally:
        if handle is not None:
            handle.remove()


def dispatch_noised_batch(trainer, module, nb: NoisedBatch) -> NoisedBatch:
    """Every NoisedBatchHooks callback's on_noised_batch_start, then every one's on_noised_batch, in list order."""
    hooks = [cb for cb in trainer.callbacks if isinstance(cb, NoisedBatchHooks)]
    for cb in hooks:
        cb.on_noised_batch_start(trainer, module, nb)
    for cb in hooks:
        cb.on_noised_batch(trainer, module, nb)
    return nb
