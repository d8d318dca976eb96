"""Mixture-of-experts blocks, as PruneCallback sees them.

Structure (found in each transformer block, no model-specific names):
  * an *experts list* is a ModuleList inside a block whose children hold nn.Linear layers;
  * its *router* is an nn.Linear with one output per expert sitting next to it (same parent: OLMoE / LLaDA-MoE /
    Mixtral `gate`), or such a Linear child of a sibling module (DiffusionGemma's `router.proj`).  Routers stay
    dense unless a `targets` pattern names them.
Fused 3-D experts (transformers 5) are turned into such a list on loading (pipeline/model/fused_experts.py).

Routed tokens: an expert's Linear layers see only the tokens routed to it, as a 2-D [n_routed, d] tensor.
To weight each row by its own token's weight (1 − sink score, 0 on padding) the statistics need to know
which token every row is.  The protocol: while an expert runs, the expert module's attribute
`routed_tokens` holds a LongTensor [n_routed] of the rows' flat indices into the [B·L] batch
(`pipeline/zoo/tiny_llada_moe/modeling_llada_moe.py` sets it).  A model whose experts do not expose it
can still be pruned by magnitude, or with its experts left out (`ignore: ['experts']`).
"""
from __future__ import annotations

import torch


def find_moe(block: torch.nn.Module, prefix: str) -> tuple[set[str], dict[str, torch.nn.Module]]:
    """(full names of the router Linears, {full name of each expert: expert module}) of one block."""
    routers: set[str] = set()
    experts: dict[str, torch.nn.Module] = {}
    for name, parent in block.named_modules():
        lists = {n: m for n, m in parent.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)
                 and all(any(isinstance(x, torch.nn.Linear) for x in c.modules()) for c in m)}
        for list_name, experts_list in lists.items():
            gates = [n for n, m in _router_candidates(parent) if m.out_features == len(experts_list)]
            if not gates:
                continue
            base = ".".join(p for p in (prefix, name) if p)
            routers.update(f"{base}.{g}" for g in gates)
            experts.update({f"{base}.{list_name}.{i}": e for i, e in enumerate(experts_list)})
    return routers, experts


def _router_candidates(parent: torch.nn.Module):
    """(name under parent, Linear) of the parent's Linear children and of its other children's Linear children."""
    for n, m in parent.named_children():
        if isinstance(m, torch.nn.Linear):
            yield n, m
        elif not isinstance(m, torch.nn.ModuleList):
            yield from ((f"{n}.{c}", l) for c, l in m.named_children() if isinstance(l, torch.nn.Linear))


def expert_of(layer_name: str, experts: dict[str, torch.nn.Module]) -> str | None:
    """The expert that holds a Linear layer, by name (None for dense layers)."""
    return next((e for e in experts if layer_name.startswith(f"{e}.")), None)


def checked_tokens(expert: torch.nn.Module, layer_name: str) -> torch.Tensor:
    """The expert's `routed_tokens` while it runs (called from its Linear layers' hooks)."""
    tokens = getattr(expert, "routed_tokens", None)
    if tokens is None:
        raise RuntimeError(f"{layer_name} ran inside an MoE expert whose `routed_tokens` is not set; "
                           "the model must set it while the expert runs (see callbacks/moe.py)")
    return tokens


def routed_rows(x: torch.Tensor, tokens: torch.Tensor, n_samples: int, seqlen: int):
    """Split an expert's input by sample: yields (b, rows of x [n_b, d], their positions [n_b]).

    x: [n_routed, d]; tokens: [n_routed] flat indices into the [B·L] batch.  Rows keep their order, so a
    sample's rows (hence its statistic) do not depend on which other samples share its batch."""
    if tokens.shape[0] != x.shape[0]:
        raise RuntimeError(f"an expert received {x.shape[0]} rows but `routed_tokens` names {tokens.shape[0]}")
    sample = tokens // seqlen
    for b in range(n_samples):
        keep = sample == b
        yield b, x[keep], tokens[keep] - b * seqlen
