"""The attention probe on models whose attention is torch.compile'd (LLaDA's remote code wraps SDPA in a
module-level `@torch.compile()`): the probed and the hooked passes add no graph break, no recompile and no
compile at all, and the mass equals the eager probe's.

Two twins: a test-local one mirroring LLaDA's layout (a module-level compiled wrapper that calls
F.scaled_dot_product_attention, GQA heads repeated before it), compiled with a counting backend so that the
test is fast; and tiny-llada itself, copied to a temp dir with its SDPA call routed through a module-level
`@torch.compile()` (the default inductor backend, as in LLaDA's code)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from pipeline.model.calibration import StopForward
from pipeline.maths.attention import AttentionMassProbe

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6 (set_stance)")

COUNTER = CompileCounter()


@torch.compile(backend=COUNTER)
def compiled_sdpa(q, k, v, mask=None, attn_mask=None, dropout_p=0.0, is_causal=False):
    """LLaDA's module-level wrapper (modeling_llada.py: `@torch.compile() def scaled_dot_product_attention`)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def eager_sdpa(q, k, v, mask=None, attn_mask=None, dropout_p=0.0, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class Block(nn.Module):
    def __init__(self, d=32, heads=4, kv_heads=2, sdpa=compiled_sdpa):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.sdpa = heads, kv_heads, d // heads, sdpa
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, 2 * d, bias=False)
        self.ff_out = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1, output_size=self.heads)  # LLaDA repeats kv heads before SDPA
        v = v.repeat_interleave(groups, dim=1, output_size=self.heads)
        att = self.sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ff_out(F.silu(self.ff_proj(x)))


class Twin(nn.Module):
    def __init__(self, sdpa=compiled_sdpa, layers=2, vocab=50, d=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, sdpa=sdpa) for _ in range(layers))

    def forward(self, ids):
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x)
        return x


def _twins():
    torch.manual_seed(0)
    compiled = Twin().eval()
    eager = Twin(sdpa=eager_sdpa).eval()
    eager.load_state_dict(compiled.state_dict())
    return compiled, eager


def _ids(batch, length=12, seed=0):
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed + batch))


def _snapshot():
    """(frames compiled, graphs, graph breaks) so far, from dynamo's own counters."""
    return (COUNTER.frame_count, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))


def _stance() -> str:
    from torch._dynamo import eval_frame

    return eval_frame._stance.stance


def _probed(model, ids):
    with torch.no_grad(), AttentionMassProbe(per_layer=True) as probe:
        out = model(ids)
    probe.require_attention()
    return out, probe


def _hooked(model, ids):
    """A PruneCallback-style pass: forward hooks on every Linear reading its input."""
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(i[0].pow(2).sum(0))) for m in model.modules()
               if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    COUNTER.clear()
    yield
    torch._dynamo.reset()


def test_probe_and_hooked_passes_add_no_graph_break_and_no_recompile():
    model, _ = _twins()
    with torch.no_grad():
        for batch in (1, 2, 1, 2):  # unprobed: compiles once per batch size (then dynamic), as it would anyway
            model(_ids(batch))
    before = _snapshot()
    assert before[0] >= 1 and before[2] == 0
    for batch in (1, 2, 3, 1):  # batch 3 was never seen: under the probe it must not compile either
        _, probe = _probed(model, _ids(batch))
        assert probe.calls == 2 and probe.mass.shape == (batch, 12)
        assert _stance() == "default"
        _hooked(model, _ids(batch))
        with torch.no_grad():
            model(_ids(2))  # unprobed again between probes: the cached graph, no recompile
    # the hooked pass at batch 3 compiles like any unprobed new shape would (dynamic batch: nothing new)
    assert _snapshot() == before, f"probe or hooked passes compiled something: {before} -> {_snapshot()}"
    assert not counters["graph_break"]


def test_first_forward_under_probe_compiles_nothing():
    """No cold-start penalty: a probed forward of a never-compiled model compiles nothing."""
    model, _ = _twins()
    for batch in (1, 2):
        _probed(model, _ids(batch))
    assert _snapshot() == (0, 0, 0)
    with torch.no_grad():
        model(_ids(1))  # and the model still compiles normally afterwards
    assert COUNTER.frame_count == 1


def test_mass_and_outputs_equal_the_eager_probe():
    model, eager = _twins()
    with torch.no_grad():
        model(_ids(2))  # compiled and cached first
    for batch in (1, 2):
        out, probe = _probed(model, _ids(batch))
        out_eager, probe_eager = _probed(eager, _ids(batch))
        assert torch.equal(probe.mass, probe_eager.mass)
        assert all(torch.equal(a, b) for a, b in zip(probe.per_layer, probe_eager.per_layer))
        assert torch.equal(out, out_eager)  # outputs untouched by the probe
        with torch.no_grad():
            torch.testing.assert_close(model(_ids(batch)), out_eager, rtol=1e-5, atol=1e-5)  # compiled again


def test_stance_restored_after_an_exception_inside_the_probe_and_when_nested():
    model, eager = _twins()
    with pytest.raises(StopForward):
        with AttentionMassProbe():
            raise StopForward()  # forward_through_blocks stops a forward this way
    assert _stance() == "default"
    with torch.no_grad(), AttentionMassProbe() as outer:
        with AttentionMassProbe() as inner:
            model(_ids(1))
        assert _stance() == "force_eager"
        model(_ids(1))
    assert _stance() == "default"
    assert inner.calls == 2 and outer.calls == 4
    assert COUNTER.frame_count == 0


def test_whole_model_compiled_is_probed_too():
    model, eager = _twins()
    whole = torch.compile(eager, backend=COUNTER)
    with torch.no_grad():
        whole(_ids(1))
    compiled_frames = COUNTER.frame_count
    _, probe = _probed(whole, _ids(1))
    _, probe_eager = _probed(eager, _ids(1))
    assert probe.calls == 2 and torch.equal(probe.mass, probe_eager.mass)
    assert COUNTER.frame_count == compiled_frames


# --- tiny-llada with LLaDA's module-level @torch.compile() (default backend) --------------------------------

COMPILED_WRAPPER = '''

@torch.compile()
def scaled_dot_product_attention(q, k, v, mask=None, attn_mask=None, dropout_p=0.0, is_causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

'''


@pytest.fixture(scope="module")
def compiled_tiny_llada(tmp_path_factory):
    from pipeline.model.loading import load_dlm, resolve_path

    src = resolve_path("tiny-llada")
    dst = tmp_path_factory.mktemp("compiled") / "tiny_llada_compiled"
    shutil.copytree(src, dst)
    code = (dst / "modeling_llada.py").read_text()
    code, n = re.subn(r"out = F\.scaled_dot_product_attention\(", "out = scaled_dot_product_attention(", code)
    assert n == 1, "tiny-llada's attention call moved; update this test"
    code = code.replace("\n\nclass RMSLayerNorm", COMPILED_WRAPPER + "\nclass RMSLayerNorm", 1)
    (dst / "modeling_llada.py").write_text(code)
    compiled, _ = load_dlm(str(dst))
    eager, _ = load_dlm("tiny-llada")
    return compiled, eager


def test_tiny_llada_with_compiled_attention(compiled_tiny_llada):
    from pipeline.model.calibration import last_block
    from callbacks.sink_stats import SinkStatsCallback  # noqa: F401  (the callbacks' import path stays valid)
    from pipeline.model.calibration import forward_through_blocks
    from types import SimpleNamespace

    compiled, eager = compiled_tiny_llada
    ids = {b: torch.randint(4, 4096, (b, 24), generator=torch.Generator().manual_seed(b)) for b in (1, 2)}
    with torch.no_grad():
        for b in (1, 2, 1, 2):
            compiled(input_ids=ids[b])
    before = (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    holder = SimpleNamespace(model=compiled)
    for b in (2, 1):
        with torch.no_grad(), AttentionMassProbe() as probe:
            forward_through_blocks(holder, ids[b], stop_after=last_block(compiled))  # as SinkStatsCallback does
        with torch.no_grad(), AttentionMassProbe() as probe_eager:
            eager(input_ids=ids[b])
        assert probe.calls == probe_eager.calls == eager.config.n_layers
        torch.testing.assert_close(probe.mass, probe_eager.mass, rtol=1e-6, atol=1e-5)
        _hooked(compiled, ids[b])
    assert (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) == before
