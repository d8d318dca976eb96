"""Logits only where they are read: the LM head (vocabulary projection) applied to chosen positions.

Scoring reads the logits of a few positions (the masked tokens of a held-out window, the continuation of a
benchmark question), but a forward computes the head over every position; for a small encoder the head is
about half of the forward (minilm-dlm: 384 x 30522 per token vs ~10M multiply-adds for its six layers).

    logits = logits_at(model, lambda: model(input_ids=ids).logits, where)   # where: [B, L] bool -> [B, L, V]
    logits = suffix_logits(model, lambda: model(input_ids=ids).logits, n)  # the last n positions -> [B, n, V]

A forward pre-hook on `model.get_output_embeddings()` (an nn.Linear) hands it only the chosen rows, so each
chosen logit is the same dot product as in a full forward.  Models that compute their head otherwise (a tied
`F.linear(x, wte.weight)`, no output embedding, a head the hook cannot slice) get the full forward, sliced
after: same values, no saving.  Positions not chosen hold zeros in `logits_at`'s result; its chosen logits are
bit-identical to the full forward's (held-out scores are golden-tested), `suffix_logits`' equal to rounding.
"""
from __future__ import annotations

import torch

# BLAS routes a head input of very few rows (under 16 here) through kernels whose sums differ from the
# blocked kernel's in the last bit; from 16 rows on, each row's logits are those of the full forward.
MIN_ROWS = 32
_FULL_ONLY = "_sinkprune_full_head"  # set on a model whose forward failed with a sliced head: never slice again


class _SliceHead:
    """Forward pre-hook: the head's input [B, L, H] -> its chosen rows (first call of one forward only)."""

    def __init__(self, select):
        self.select, self.fired = select, False

    def __call__(self, module, args):
        x = args[0]
        if self.fired or not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        if isinstance(self.select, int):
            out = x[:, x.shape[1] - self.select:]
        elif tuple(self.select.shape) == tuple(x.shape[:2]):
            out = x[self.select.to(x.device)]
        else:  # another batch layout (e.g. a model that doubles the batch): leave it whole
            return None
        self.fired = True
        return (out, *args[1:])


def _head(model) -> torch.nn.Linear | None:
    if getattr(model, _FULL_ONLY, False):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Linear) else None


def _forward_with(model, forward, select):
    """(logits, whether the head saw only the chosen rows)."""
    head = _head(model)
    if head is None:
        return forward(), False
    hook = _SliceHead(select)
    handle = head.register_forward_pre_hook(hook)
    try:
        logits = forward()
    except (RuntimeError, IndexError, ValueError):
        handle.remove()
        if not hook.fired:
            raise
        setattr(model, _FULL_ONLY, True)  # its forward needs the whole sequence after the head
        return forward(), False
    finally:
        handle.remove()
    return logits, hook.fired


def suffix_logits(model, forward, n: int) -> torch.Tensor:
    """forward()'s logits [B, L, V] at the last n positions, [B, n, V], computing the head only there."""
    logits, sliced = _forward_with(model, forward, int(n))
    if sliced and not (logits.dim() == 3 and logits.shape[1] == n):
        setattr(model, _FULL_ONLY, True)
        logits, sliced = forward(), False
    return logits if sliced else logits[:, logits.shape[1] - n:]


def at_least(where: torch.Tensor, rows: int = MIN_ROWS) -> torch.Tensor:
    """`where` with its first unchosen positions added until `rows` are chosen (all of them if fewer exist)."""
    missing = rows - int(where.sum())
    if missing <= 0:
        return where
    flat = where.flatten().clone()
    flat[(~flat).nonzero().flatten()[:missing]] = True
    return flat.view_as(where)


def logits_at(model, forward, where: torch.Tensor) -> torch.Tensor:
    """forward()'s logits [B, L, V], computed only where `where` ([B, L] bool) is True (zeros elsewhere).

    The chosen logits carry the bits of a full forward: at least MIN_ROWS rows go through the head."""
    where = at_least(where)
    if bool(where.all()):
        return forward()
    logits, sliced = _forward_with(model, forward, where)
    if not sliced:
        return logits
    if logits.dim() != 2 or logits.shape[0] != int(where.sum()):  # something after the head reshaped them
        setattr(model, _FULL_ONLY, True)
        return forward()
    full = logits.new_zeros(*where.shape, logits.shape[-1])
    full[where.to(logits.device)] = logits
    return full
