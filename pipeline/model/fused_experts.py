"""Fused MoE experts as per-expert nn.Linear modules, so that the pruner sees (and prunes) every expert.

transformers 5 stores the experts of many MoE models fused in one module (`@use_experts_implementation`:
DiffusionGemma, Qwen3-MoE, Mixtral, ...): 3-D parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I],
called as `experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`.  Those are not nn.Linear,
so they would stay dense.  `unfuse_experts(model)` (run by `load_dlm`) replaces each such module, recognised by
structure (those two parameters and nothing else, that forward signature), with `UnfusedExperts`: an nn.ModuleList
of `ExpertMLP`s holding bias-free nn.Linear `gate_up_proj` / `down_proj` (weights that are views of the fused
tensors: no copy), whose forward is the class's eager forward step for step (bit-identical outputs; checked on
every expert when converting, else the module is left fused with a warning).  While an expert runs, its
`routed_tokens` holds the flat token indices it sees (the protocol of callbacks/moe.py), and the router (a sibling
module with a Linear of one output per expert) stays beside the list, so the MoE machinery finds it.

Saving keeps the original layout: the state dict presents the fused keys `<prefix>gate_up_proj` / `down_proj`
with their original shapes (a zero-copy view when the experts' weights still lie side by side in one storage, as
after conversion; otherwise they are first re-fused into one), and loading fused keys splits them.  So
`save_pretrained` writes a checkpoint that the unmodified class loads, and modules shared by tied encoder/decoder
layers present the same storage under both names (transformers drops the tied copy).
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

PROJECTIONS = ("gate_up_proj", "down_proj")
SIGNATURE = ["hidden_states", "top_k_index", "top_k_weights"]


class ExpertMLP(nn.Module):
    """One expert: down_proj(act(gate) * up), (gate, up) = gate_up_proj(x).chunk(2); x [n_routed, H]."""

    routed_tokens: torch.Tensor | None = None  # flat [B·L] indices of the rows while it runs (callbacks/moe.py)

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, device="meta")
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(gate_up)
        self.down_proj.weight = nn.Parameter(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: same call, same outputs, same state-dict keys and shapes."""

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj, fused.down_proj
        super().__init__(ExpertMLP(gate_up.data[e], down.data[e], fused.act_fn) for e in range(gate_up.shape[0]))
        for p in self.parameters():
            p.requires_grad_(gate_up.requires_grad)
        self.num_experts = gate_up.shape[0]
        self.register_state_dict_post_hook(_present_fused)
        self.register_load_state_dict_pre_hook(_split_fused)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit[:, 0].tolist():
            if e == self.num_experts:  # the "no expert" slot
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            expert = self[e]
            expert.routed_tokens = token_idx
            try:
                out = expert(hidden_states[token_idx])
            finally:
                expert.routed_tokens = None
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def fused(self, proj: str) -> torch.Tensor:
        """The [E, ...] tensor of every expert's `proj` weight: a view over their shared storage, re-fusing them
        into one storage first when they no longer lie side by side (after a `.to()`, say)."""
        weights = [getattr(expert, proj).weight for expert in self]
        first = weights[0]
        numel, storage = first.numel(), first.untyped_storage()
        adjacent = all(w.is_contiguous() and w.shape == first.shape and w.dtype == first.dtype
                       and w.untyped_storage().data_ptr() == storage.data_ptr()
                       and w.storage_offset() == first.storage_offset() + e * numel for e, w in enumerate(weights))
        if not adjacent:
            with torch.no_grad():
                stacked = torch.stack([w.detach() for w in weights])
                for e, w in enumerate(weights):
                    w.data = stacked[e]
            return stacked
        view = first.detach().new_empty(0)
        return view.set_(storage, first.storage_offset(), (len(weights), *first.shape), (numel, *first.stride()))


def _present_fused(module: UnfusedExperts, state_dict, prefix: str, local_metadata) -> None:
    for proj in PROJECTIONS:
        for e in range(len(module)):
            state_dict.pop(f"{prefix}{e}.{proj}.weight", None)
        state_dict[prefix + proj] = module.fused(proj)


def _split_fused(module: UnfusedExperts, state_dict, prefix: str, *args) -> None:
    for proj in PROJECTIONS:
        if prefix + proj in state_dict:
            fused = state_dict.pop(prefix + proj)
            state_dict.update({f"{prefix}{e}.{proj}.weight": fused[e] for e in range(fused.shape[0])})


def is_fused_experts(module: nn.Module) -> bool:
    """Structure of a fused experts module: parameters exactly `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]
    (untransposed, bias-free, gate and up concatenated), an `act_fn`, forward(hidden_states, top_k_index,
    top_k_weights)."""
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(PROJECTIONS) or list(module.buffers(recurse=False)) \
            or not callable(getattr(module, "act_fn", None)):
        return False
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    n, two_i, hidden = gate_up.shape if gate_up.dim() == 3 else (0, 1, 0)
    if two_i % 2 or down.shape != (n, hidden, two_i // 2):
        return False
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False) \
            or not getattr(module, "is_concatenated", True) or not getattr(module, "has_gate", True):
        return False
    forward = inspect.unwrap(type(module).forward)
    return list(inspect.signature(forward).parameters)[1:4] == SIGNATURE


def same_outputs(fused: nn.Module, adapter: UnfusedExperts) -> bool:
    """Both give bit-identical outputs with every expert hit (the fused class's own eager forward)."""
    weight = fused.gate_up_proj
    n, hidden = weight.shape[0], weight.shape[2]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, hidden, generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.arange(2 * n) % n, (torch.arange(2 * n) + 1) % n], dim=1).to(weight.device)
    weights = torch.rand(2 * n, 2, generator=generator).to(weight.device, weight.dtype)
    eager = inspect.unwrap(type(fused).forward)
    with torch.no_grad():
        return torch.equal(eager(fused, x, index, weights), adapter(x, index, weights))


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of `model` by an `UnfusedExperts`, in place; returns how many.  Modules
    whose parameters are tied (a DiffusionGemma encoder layer's and its decoder layer's) get one shared adapter."""
    adapters: dict[tuple[int, int], UnfusedExperts] = {}
    for name, module in list(model.named_modules()):
        if not name or not is_fused_experts(module):
            continue
        key = (id(module.gate_up_proj), id(module.down_proj))
        if key not in adapters:
            if module.gate_up_proj.device.type == "meta":
                warnings.warn(f"{name}: fused experts on the meta device (offloaded?) are left fused, hence dense")
                continue
            adapter = UnfusedExperts(module)
            if not same_outputs(module, adapter):
                warnings.warn(f"{name}: {type(module).__name__}'s forward differs from gate_up/act/down per expert; "
                              "its experts are left fused, hence dense")
                continue
            adapters[key] = adapter
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, adapters[key])
    return len(adapters)
