"""Dense vs 2:4 semi-structured sparse: one denoising step of a LLaDA-8B-shaped stack on a GPU.

    python benchmarks/semi_structured_24.py                      # 4 layers, seq 512..4096, bf16
    python benchmarks/semi_structured_24.py --layers 2 --seq-lens 1024 --backend cutlass

A denoising step of a masked-diffusion LM is one full-sequence, bidirectional forward.  The stack has
LLaDA-8B's shapes (d_model 4096, 32 heads, SwiGLU MLP with hidden 12288, RMSNorm, RoPE theta 5e5, no
causal mask); weights are random, pruned 2:4 by magnitude (pipeline.maths.sparsity), so the "dense" model
computes with the same pruned values and the two outputs differ only by kernel rounding.  The sparse
copy goes through pipeline.maths.semi_structured.export_semi_structured.

Reports per sequence length (batch 1) the median over repeats (CUDA events) of the whole stack and of
each linear shape alone, the dense/sparse speedup, and the max abs / relative output difference;
writes benchmarks/results/semi_structured_24.json.  Needs an Ampere-or-newer CUDA GPU; exits with a
message elsewhere.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.maths.semi_structured import check_2_4, export_semi_structured  # noqa: E402
from pipeline.maths.sparsity import apply_mask_, magnitude_scores, select_mask  # noqa: E402

LLADA_8B = {"d_model": 4096, "n_heads": 32, "mlp_hidden": 12288, "rope_theta": 500000.0}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_tables(seq_len, head_dim, theta, device, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Block(nn.Module):
    """LLaDA's Llama-style block: pre-norm attention (bidirectional) and a SwiGLU MLP, no biases."""

    def __init__(self, d_model, n_heads, mlp_hidden):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm, self.ff_norm = RMSNorm(d_model), RMSNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.ff_proj = nn.Linear(d_model, mlp_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, mlp_hidden, bias=False)
        self.ff_out = nn.Linear(mlp_hidden, d_model, bias=False)

    def forward(self, x, cos, sin):
        batch, seq_len, d_model = x.shape
        h = self.attn_norm(x)
        heads = [proj(h).view(batch, seq_len, self.n_heads, -1).transpose(1, 2)
                 for proj in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = apply_rope(heads[0], cos, sin), apply_rope(heads[1], cos, sin), heads[2]
        attn = F.scaled_dot_product_attention(q, k, v)  # no causal mask: diffusion LMs attend both ways
        # reshape (a copy) keeps the input to the sparse linear contiguous, which its kernel wants
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq_len, d_model))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, layers, d_model, n_heads, mlp_hidden, rope_theta):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_hidden) for _ in range(layers))
        self.norm = RMSNorm(d_model)
        self.head_dim, self.rope_theta = d_model // n_heads, rope_theta

    def forward(self, x):
        cos, sin = rope_tables(x.shape[1], self.head_dim, self.rope_theta, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)


def prune_2_4_by_magnitude_(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                apply_mask_(module.weight, select_mask(magnitude_scores(module.weight), n_m=(2, 4)))
                assert check_2_4(module.weight)


def cuda_median_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def require_gpu():
    if not torch.cuda.is_available():
        sys.exit("semi_structured_24: no CUDA GPU here; 2:4 sparse kernels need an Ampere-or-newer NVIDIA GPU "
                 "(compute capability >= 8.0, e.g. A100/H100) — run this benchmark on one")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        sys.exit(f"semi_structured_24: {torch.cuda.get_device_name()} has compute capability {major}.{minor}; "
                 "2:4 sparse kernels need >= 8.0 (A100/H100)")


def choose_backend(name):
    from torch.sparse import SparseSemiStructuredTensor

    if name == "auto":
        has_cusparselt = getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.is_available()
        name = "cusparselt" if has_cusparselt else "cutlass"
    SparseSemiStructuredTensor._FORCE_CUTLASS = name == "cutlass"
    return name


def time_linears(dense, sparse, tokens, linear_shapes, seq_len, dtype, args) -> dict:
    """Each LLaDA-8B linear shape alone, dense vs 2:4, on as many tokens as one denoising step."""
    out = {}
    for label, (out_f, in_f) in linear_shapes.items():
        name = next(n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and tuple(m.weight.shape) == (out_f, in_f))
        dense_weight, sparse_weight = dense.get_submodule(name).weight, sparse.get_submodule(name).weight
        inp = torch.randn(tokens.shape[0], in_f, device="cuda", dtype=dtype)
        lin_dense, _ = cuda_median_ms(lambda: F.linear(inp, dense_weight), args.warmup, args.repeats)
        lin_sparse, _ = cuda_median_ms(lambda: F.linear(inp, sparse_weight), args.warmup, args.repeats)
        print(f"{seq_len:>6} {label:>22} {lin_dense:9.3f} {lin_sparse:9.3f} {lin_dense / lin_sparse:8.3f}")
        out[label] = {"dense_ms": lin_dense, "sparse_ms": lin_sparse, "speedup_dense_over_sparse": lin_dense / lin_sparse}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="LLaDA-8B has 32; a few give the per-layer picture")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--backend", choices=["auto", "cusparselt", "cutlass"], default="auto")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-linear-table", action="store_true", help="skip timing each linear shape alone")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "semi_structured_24.json"))
    args = parser.parse_args()

    require_gpu()
    backend = choose_backend(args.backend)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = Stack(args.layers, **LLADA_8B).to(dtype).eval()
    prune_2_4_by_magnitude_(dense)
    sparse = copy.deepcopy(dense)
    report = export_semi_structured(sparse)
    expected = 7 * args.layers
    if len(report["converted"]) != expected:
        sys.exit(f"semi_structured_24: converted {len(report['converted'])} of {expected} linears: {report['skipped']}")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  backend {report['backend']}  "
          f"{args.layers} layers  {args.dtype}  batch {args.batch}")

    d_model, hidden = LLADA_8B["d_model"], LLADA_8B["mlp_hidden"]
    linear_shapes = {"attn 4096->4096": (d_model, d_model), "mlp up 4096->12288": (hidden, d_model),
                     "mlp down 12288->4096": (d_model, hidden)}
    results = []
    header = f"{'seq':>6} {'what':>22} {'dense_ms':>9} {'2:4_ms':>9} {'speedup':>8} {'max|diff|':>10} {'rel_diff':>9}"
    print(header)
    with torch.inference_mode():
        for seq_len in args.seq_lens:
            x = torch.randn(args.batch, seq_len, d_model, device="cuda", dtype=dtype)
            dense_ms, dense_times = cuda_median_ms(lambda: dense(x), args.warmup, args.repeats)
            sparse_ms, sparse_times = cuda_median_ms(lambda: sparse(x), args.warmup, args.repeats)
            out_dense, out_sparse = dense(x).float(), sparse(x).float()
            max_diff = (out_dense - out_sparse).abs().max().item()
            rel_diff = ((out_dense - out_sparse).norm() / out_dense.norm()).item()
            print(f"{seq_len:>6} {'denoising step':>22} {dense_ms:9.3f} {sparse_ms:9.3f} {dense_ms / sparse_ms:8.3f} "
                  f"{max_diff:10.3e} {rel_diff:9.2e}")
            row = {"seq_len": seq_len, "batch": args.batch, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                   "speedup_dense_over_sparse": dense_ms / sparse_ms, "dense_times_ms": dense_times,
                   "sparse_times_ms": sparse_times, "max_abs_diff": max_diff, "relative_l2_diff": rel_diff,
                   "dense_output_max_abs": out_dense.abs().max().item(), "linears": {}}
            if not args.no_linear_table:
                row["linears"] = time_linears(dense, sparse, x.reshape(-1, d_model), linear_shapes, seq_len, dtype, args)
            results.append(row)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "backend": report["backend"], "backend_arg": backend,
            "dtype": args.dtype, "layers": args.layers, "shapes": LLADA_8B, "warmup": args.warmup,
            "repeats": args.repeats, "converted_linears": len(report["converted"])}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
