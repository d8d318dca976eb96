"""pipeline/model/fused_experts.py on a hand-made fused-experts block (transformers 5's 3-D layout), any transformers:
same outputs, routed tokens per expert, the fused state-dict layout kept, tied modules sharing one adapter."""
import pytest
import torch
from torch import nn

from callbacks import moe
from pipeline.model.fused_experts import UnfusedExperts, is_fused_experts, unfuse_experts

N, HIDDEN, INTER, TOKENS = 4, 8, 8, 12


class Fused(nn.Module):
    """The layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]; each routed token slot adds w * expert(x)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter(torch.randn(N, 2 * INTER, HIDDEN, generator=g))
        self.down_proj = nn.Parameter(torch.randn(N, HIDDEN, INTER, generator=g))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(N):
            slot, token = torch.where((top_k_index == e).T)
            if len(token):
                gate, up = (hidden_states[token] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
                y = (self.act_fn(gate) * up) @ self.down_proj[e].T
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class Clamped(Fused):
    """Same structure, other maths: must be left fused."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return super().forward(hidden_states.clamp(-0.5, 0.5), top_k_index, top_k_weights)


class Block(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.router = nn.Module()
        self.router.proj = nn.Linear(HIDDEN, N, bias=False)
        self.experts = experts


def routing(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    index = torch.stack([torch.randperm(N, generator=g)[:2] for _ in range(TOKENS)])
    return x, index, torch.rand(TOKENS, 2, generator=g)


def test_recognised_by_structure_only():
    assert is_fused_experts(Fused())
    transposed = Fused()
    transposed.gate_up_proj = nn.Parameter(torch.randn(N, HIDDEN, 2 * INTER))
    extra = Fused()
    extra.register_buffer("bias", torch.zeros(1))
    assert not is_fused_experts(transposed) and not is_fused_experts(extra) and not is_fused_experts(nn.Linear(2, 2))


def test_same_outputs_and_routed_tokens_per_expert():
    fused = Fused()
    adapter = UnfusedExperts(fused)
    x, index, weights = routing()
    seen = {}
    for e, expert in enumerate(adapter):
        expert.down_proj.register_forward_hook(lambda m, i, o, e=e: seen.update({e: adapter[e].routed_tokens.clone()}))
    with torch.no_grad():
        assert torch.equal(adapter(x, index, weights), fused(x, index, weights))
    for e in range(N):
        assert sorted(seen[e].tolist()) == (index == e).any(-1).nonzero()[:, 0].tolist()
        assert adapter[e].routed_tokens is None                                   # only while it runs
    assert all(isinstance(expert.gate_up_proj, nn.Linear) and expert.gate_up_proj.bias is None for expert in adapter)


def test_state_dict_is_the_fused_layout_and_loads_back():
    fused = Fused()
    adapter = UnfusedExperts(fused)
    state = adapter.state_dict()
    assert list(state) == ["gate_up_proj", "down_proj"]
    assert all(torch.equal(state[k], v) for k, v in fused.state_dict().items())
    assert state["gate_up_proj"].data_ptr() == adapter[0].gate_up_proj.weight.data_ptr()    # no copy
    other = UnfusedExperts(Fused(seed=5))
    assert not torch.equal(other[1].down_proj.weight, adapter[1].down_proj.weight)
    other.load_state_dict(state)                                                  # strict: fused keys split
    assert torch.equal(other[1].down_proj.weight, adapter[1].down_proj.weight)
    adapter.to(torch.float64)                                                     # weights no longer side by side
    again = adapter.state_dict()
    assert again["down_proj"].dtype == torch.float64 and torch.equal(again["down_proj"], fused.down_proj.double())
    assert adapter[2].down_proj.weight.data_ptr() == again["down_proj"][2].data_ptr()       # re-fused in place


def test_unfuse_model_shares_tied_modules_and_finds_router():
    model = nn.Module()
    model.layers = nn.ModuleList([Block(Fused()), Block(Fused(seed=3)), Block(Clamped())])
    model.tied = Block(Fused())
    model.tied.experts.gate_up_proj = model.layers[0].experts.gate_up_proj      # tied like DiffusionGemma's encoder
    model.tied.experts.down_proj = model.layers[0].experts.down_proj
    x, index, weights = routing()
    with torch.no_grad():
        before = [block.experts(x, index, weights) for block in model.layers]
    with pytest.warns(UserWarning, match=r"layers\.2\.experts: Clamped's forward differs.*left fused"):
        assert unfuse_experts(model) == 2
    assert model.tied.experts is model.layers[0].experts and isinstance(model.layers[1].experts, UnfusedExperts)
    assert type(model.layers[2].experts) is Clamped
    with torch.no_grad():
        assert all(torch.equal(b.experts(x, index, weights), y) for b, y in zip(model.layers, before))
    state = model.state_dict()
    assert state["tied.experts.gate_up_proj"].data_ptr() == state["layers.0.experts.gate_up_proj"].data_ptr()
    routers, experts = moe.find_moe(model.layers[1], "layers.1")
    assert routers == {"layers.1.router.proj"} and list(experts) == [f"layers.1.experts.{e}" for e in range(N)]
