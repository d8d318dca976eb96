"""Calibration from cached block inputs: the statistics of block i come from running block i alone on the outputs
of block i − 1 (pruned, when layer-sequential), kept in memory, instead of a forward from the embeddings.

Layer-sequential: one stats pass and one output pass per block and batch (2·L block passes instead of L(L+1)/2), the
same calls with the same arguments as the full forward, so the same bits (tests/test_reference_flavor.py).  Used when
the statistics do not need sink scores of the partly pruned model: clean inputs (flavor=reference) and pruners whose
scores are each sample's timestep mean s̄ from the dense model.  The batches are kept as token ids (checkpointable);
the block inputs exist only inside `calibrate_from_cache`.  Assumed, as by SparseGPT's and the reference's own
"Catcher": the model calls its blocks one after another, each on the previous block's output; when the blocks get
different arguments besides the hidden states (checked once per run), each block's own arguments are captured.

With an offloaded model (DLMModule(offload=...), pipeline/model/offload.py) every method calibrates this way, each
block onloaded for its passes and the next one prefetched.  Sink-aware statistics need each window's attention mass
over ALL layers before the first statistic is weighted, so the noised batches take two block-by-block passes:
`mass_from_cache` (the probe on every block: the mass, then the scores) and then `calibrate_from_cache` (the weighted
statistics): every block crosses to the device twice and runs twice per batch, where the resident single pass reads
the Linear inputs off the probed forward.  Layer-sequential with the partly pruned model's scores repeats both per
block (about 1.5·L² block onloads).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from callbacks.reduction import all_ranks, world
from callbacks.schedule import eager_stance
from pipeline.model.calibration import NoisedBatch, StopForward, find_blocks, forward_through_blocks, mask_window

_CACHE_KEYS = ("layer_past", "past_key_value", "past_key_values")  # a block must not write into a shared KV cache


class RecordedBatches:
    """The calibration epoch's inputs as token ids, in dispatch order, each (sample, step) once (a resumed run replays
    none): the clean windows once per sample (`clean`), or the noised x_t of every timestep."""

    def __init__(self):
        self.batches: list[tuple[list[int], torch.Tensor, torch.Tensor | None, int]] = []  # (ids, tokens, mask, step)
        self.keys: set[tuple[int, int]] = set()

    ids = property(lambda self: {sid for sid, _ in self.keys})

    def record(self, nb: NoisedBatch, clean: bool) -> None:
        if clean and nb.step != 0:
            return
        step = 0 if clean else nb.step
        fresh = [sid if sid >= 0 and (sid, step) not in self.keys else -1 for sid in nb.sample_ids]
        if any(sid >= 0 for sid in fresh):
            mask = None if nb.attention_mask is None else nb.attention_mask.detach().cpu()
            self.batches.append((fresh, (nb.clean_ids if clean else nb.input_ids).detach().cpu(), mask, step))
            self.keys.update((sid, step) for sid in fresh if sid >= 0)

    def noised_batches(self, device) -> list[NoisedBatch]:
        """One NoisedBatch per record (samples counted before a resume carry id −1: skipped); `masked` is not kept."""
        out = []
        for sids, ids, mask, step in self.batches:
            ids = ids.to(device)
            out.append(NoisedBatch(ids, ids, torch.zeros_like(ids, dtype=torch.bool), 0.0, step, sids,
                                   None if mask is None else mask.to(device)))
        return out

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = list(state.get("batches", []))
        self.keys = {(sid, step) for sids, _, _, step in self.batches for sid in sids if sid >= 0}


def _hidden(call: tuple[list, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[list, dict], hidden: torch.Tensor) -> tuple[list, dict]:
    args, kwargs = call
    return ([hidden, *args[1:]], kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _run(block, call: tuple[list, dict], hidden: torch.Tensor) -> torch.Tensor:
    """The block's output hidden states for `call`'s arguments with `hidden` as its input."""
    args, kwargs = _with_hidden(call, hidden)
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_calls(pl_module, input_ids, attention_mask=None, blocks=None, first: bool = False) -> list[tuple[list, dict]]:
    """The (args, kwargs) each of `blocks` (default: the first only) is called with in one forward of `input_ids`;
    the forward stops before the last of them runs.  KV caches are dropped (None) from the arguments.  `first`: the
    catch runs before the blocks' other pre-hooks (an offloader's: the last block is not onloaded to be skipped)."""
    model_blocks = [b for _, b in find_blocks(pl_module.model)]
    blocks = blocks or model_blocks[:1]
    calls: dict[int, tuple[list, dict]] = {}

    def catch(module, args, kwargs):
        kwargs = {k: (None if k in _CACHE_KEYS else False if k == "use_cache" else v) for k, v in kwargs.items()}
        calls[id(module)] = (list(args), kwargs)
        if module is blocks[-1]:
            raise StopForward()

    handles = [b.register_forward_pre_hook(catch, with_kwargs=True, prepend=first) for b in blocks]
    try:
        forward_through_blocks(pl_module, input_ids, attention_mask)
    finally:
        for h in handles:
            h.remove()
    return [calls[id(b)] for b in blocks]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - an incomparable object: treat as different (the uncached path runs)
        return False


def uniform_block_calls(pl_module, eager: bool = True) -> bool:
    """True when every block is called with the same arguments besides the hidden states (one short dense
    forward): then block i can run from block i−1's cached outputs."""
    blocks = [b for _, b in find_blocks(pl_module.model)]
    ids = mask_window(pl_module)
    with torch.no_grad(), eager_stance(eager):
        calls = block_calls(pl_module, ids, None, blocks)
    def rest(call):  # everything but the hidden states
        return call[0][1:], {k: v for k, v in call[1].items() if k != "hidden_states"}

    return all(len(c[0]) == len(calls[0][0]) and _same(rest(c), rest(calls[0])) for c in calls[1:])


def _slot_major(batches: list[NoisedBatch], slot_of) -> tuple[list[int], list[int | None]]:
    """The batches' order for the hooked passes and the reduction slot each one fills: slot by slot (stable) when
    every batch's samples share one slot, so that each slot is complete before the next starts; else as given."""
    slots = [{slot_of(sid) for sid in nb.sample_ids if sid >= 0} if slot_of else set() for nb in batches]
    if not all(len(s) == 1 for s in slots):
        return list(range(len(batches))), [None] * len(batches)
    first = [min(s) for s in slots]
    return sorted(range(len(batches)), key=lambda j: first[j]), first


def calibrate_from_cache(pl_module, targets, batches: list[NoisedBatch], on_input, solve, eager: bool,
                         sequential: bool = True, uniform: bool = True, sums=None, key=lambda name: name,
                         offloader=None) -> None:
    """Calibrate on `batches` block by block from cached block inputs.  For each block that holds targets, one hooked
    pass over every batch (on_input(name, x, nb)); sequential: then solve(names) prunes them in place and one pass
    of the pruned block gives the next block's inputs; one-shot: the hooked (dense) pass gives them and solve(all)
    runs at the end.  `uniform`: every block takes block 0's arguments (else each block's own are captured).
    `sums` (SlotSums, where on_input adds under key(name)): the hooked passes go slot by slot, and each slot is folded
    into the total as soon as it is complete (SlotSums.fold: one slot alive instead of all, the same bits).
    `offloader` (pipeline/model/offload.py): each block is onloaded for its passes (the next one prefetched), the block
    inputs wait in CPU memory, and one-shot solves each block's layers before releasing it (the dense outputs already
    taken: the same masks as solving all at the end); the pruned weights are written back to the block's masters."""
    blocks = [b for _, b in find_blocks(pl_module.model)]
    park, unpark = _parking(pl_module, offloader)
    order, slots = _slot_major(batches, sums.slot_of if sums is not None else None)
    major = not slots or slots[0] is not None  # (a rank without batches agrees)
    major = all_ranks(major) if sums is not None and sums.across_ranks else major
    per_block = {id(b): names for b, names in zip(targets.block_modules, targets.block_layers)}
    last = max(i for i, b in enumerate(blocks) if id(b) in per_block)
    with torch.no_grad(), eager_stance(eager), _passes(offloader):
        calls = [block_calls(pl_module, nb.input_ids, nb.attention_mask, None if uniform else blocks[:last + 1],
                             first=offloader is not None)
                 for nb in batches]
        hidden = [park(_hidden(c[0])) for c in calls]
        calls = [[_with_hidden(c, None) for c in cs] for cs in calls]  # the hidden states live in `hidden` only
        _inputs_made(offloader)
        for i, block in enumerate(blocks[:last + 1]):
            names = per_block.get(id(block), [])
            run = lambda j: park(_run(block, calls[j][0 if uniform else i], unpark(hidden[j])))  # noqa: B023 - called in this loop
            if offloader is not None:
                offloader.onload(i)
                offloader.prefetch(i + 1)
            fold = _folds(sums, [key(n) for n in names], major)
            for j in order if names or not sequential else ():
                nb = batches[j]
                fold(slots[j])  # the rounds of slots before this batch's are complete
                handles = [targets.layers[n].register_forward_hook(
                    lambda m, inp, out, n=n, nb=nb: on_input(n, inp[0].detach(), nb)) for n in names]
                try:
                    out = run(j)  # sequential: the outputs of the not yet pruned block are not needed
                finally:
                    for h in handles:
                        h.remove()
                if not sequential:
                    hidden[j] = out
            fold(None)
            if names and (sequential or offloader is not None):
                solve(names)
            for j in range(len(batches)) if sequential and i < last else ():
                hidden[j] = run(j)
            if offloader is not None:
                offloader.release(i, writeback=bool(names))
    if not sequential and offloader is None:
        solve(list(targets.layers))


def _folds(sums, keys: list[str], major: bool):
    """fold(slot): fold the keys' slots of every round before `slot`'s, fold(None): of every round.  A round is
    world_size consecutive slots, one per rank (each rank's batches go slot by slot, so its slot of a round is complete
    when its next round starts); every rank folds the same rounds in the same order, whichever of its slots held
    batches (under DDP a fold may be a collective).  Nothing when the batches do not go slot by slot."""
    if sums is None or not keys or not major:
        return lambda slot: None
    size, done = world()[1], [0]

    def fold(slot: int | None) -> None:
        upto = sums.slots if slot is None else slot - slot % size
        while done[0] < upto:
            done[0] += size
            sums.fold(keys, done[0])

    return fold


def solve_block_by_block(targets, solve, offloader) -> None:
    """No statistic (magnitude): each block's layers solved on the device, the pruned weights written back."""
    index = {id(b): i for i, b in enumerate(offloader.blocks)}
    with offloader.block_passes():
        offloader.outer_on("none")
        for block, names in zip(targets.block_modules, targets.block_layers):
            i = index[id(block)]
            offloader.onload(i)
            offloader.prefetch(i + 1)
            solve(names)
            offloader.release(i, writeback=True)


def _passes(offloader):
    """Offloaded: the block passes' weights outside the blocks (BlockOffloader.block_passes): no output head."""
    return offloader.block_passes() if offloader is not None else nullcontext()


def _inputs_made(offloader) -> None:
    """The block inputs are cached: the embeddings leave the device too (only blocks run from here)."""
    if offloader is not None:
        offloader.outer_on("none")


def _parking(pl_module, offloader):
    """(park, unpark): where block inputs wait between blocks.  Offloaded on CUDA with `offloader.park_inputs` (the
    plan's cache does not fit beside the block): pinned CPU memory, copied back for each pass (exact copies, in stream
    order); otherwise they stay where they are."""
    device = pl_module.device
    if offloader is None or device.type != "cuda" or not offloader.park_inputs:
        return (lambda h: h), (lambda h: h)

    def park(h):  # (non-blocking: only later work on this stream reads the copy)
        return torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=True).copy_(h, non_blocking=True)

    return park, lambda h: h.to(device, non_blocking=True)


def mass_from_cache(pl_module, batches: list[NoisedBatch], offloader, eager: bool, uniform: bool = True,
                    **probe_args) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Attention mass per key of every batch, summed over all layers, block by block from cached block inputs (the
    model's blocks onloaded one at a time): [(mass [B, L], [mass of each attention call])].  Each call's mass is the
    probe's and they are added in the forward's order, so the totals are those of one probed forward, bit for bit."""
    from pipeline.maths.attention import AttentionMassProbe

    blocks = [b for _, b in find_blocks(pl_module.model)]
    park, unpark = _parking(pl_module, offloader)
    totals: list[torch.Tensor | None] = [None] * len(batches)
    per_call: list[list[torch.Tensor]] = [[] for _ in batches]
    with torch.no_grad(), eager_stance(eager), _passes(offloader):
        calls = [block_calls(pl_module, nb.input_ids, nb.attention_mask, None if uniform else blocks, first=True)
                 for nb in batches]
        hidden = [park(_hidden(c[0])) for c in calls]
        calls = [[_with_hidden(c, None) for c in cs] for cs in calls]
        _inputs_made(offloader)
        for i, block in enumerate(blocks):
            offloader.onload(i)
            offloader.prefetch(i + 1)
            for j, nb in enumerate(batches):
                valid = nb.attention_mask.bool() if nb.attention_mask is not None else None
                with AttentionMassProbe(per_layer=True, query_weights=valid, **probe_args) as probe:
                    out = _run(block, calls[j][0 if uniform else i], unpark(hidden[j]))
                hidden[j] = park(out) if i + 1 < len(blocks) else None
                for layer_mass in probe.per_layer:  # (the probe's own order: clone, then +=)
                    totals[j] = layer_mass.clone() if totals[j] is None else totals[j].__iadd__(layer_mass)
                    per_call[j].append(layer_mass)
            offloader.release(i)
    return list(zip(totals, per_call))
