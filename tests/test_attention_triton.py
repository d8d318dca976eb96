"""The fused Triton attention-mass kernel without a GPU: its cases under Triton's interpreter (a subprocess, since
TRITON_INTERPRET must be set before triton is first imported), and the probe's CPU path, which never takes it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.maths.attention import AttentionMassProbe, attention_mass

ROOT = Path(__file__).resolve().parents[1]


def _python(*args, env=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_kernel_cases_under_the_triton_interpreter():
    """tests/triton_interpreted_cases.py: the kernel against float64 (odd T, GQA, padding, block-causal, float masks,
    is_causal, query weights, fully masked rows, NaN) and the probe taking it on tiny-sdar.  All of them must run."""
    pytest.importorskip("triton", reason="triton wheels exist for Linux x86_64 only; the probe is chunked elsewhere")
    done = _python("-m", "pytest", "tests/triton_interpreted_cases.py", "-o", "addopts=", "-q",
                   "-p", "no:cacheprovider", env={"TRITON_INTERPRET": "1"})
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in summary, summary


@pytest.mark.parametrize("dtype,mask_kind,is_causal,weights", [("bf16", 0, False, False), ("bf16", 1, True, True),
                                                                ("fp16", 2, False, True), ("fp32", 1, False, False)])
def test_kernels_build_for_hopper_without_a_gpu(dtype, mask_kind, is_causal, weights):
    """The interpreter runs Python, not the compiler: this builds both kernels to sm_90 machine code (Triton's own
    ptxas) with the default launch configs, so a construct only the compiler rejects, or a tile that overflows shared
    memory, fails here, not on the GPU."""
    triton = pytest.importorskip("triton", reason="triton wheels exist for Linux x86_64 only")
    from triton.backends.compiler import GPUTarget

    from pipeline.maths import attention_triton

    mask_pointer = {0: f"*{dtype}", 1: "*u8", 2: "*fp32"}[mask_kind]  # none (q, never read), bool, additive
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "mask_ptr": mask_pointer, "lse_ptr": "*fp32",
                "weight_ptr": "*fp32", "out_ptr": "*fp32"}
    config = attention_triton.FLOAT32_CONFIG if dtype == "fp32" else attention_triton.DEFAULT_CONFIG
    constants = {"MASK_KIND": mask_kind, "PRECISION": "tf32x3" if dtype == "fp32" else "tf32", "IS_CAUSAL": is_causal,
                 "HAS_WEIGHTS": weights, "BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"], "HEAD_DIM": 128}
    for kernel in (attention_triton._row_logsumexp_kernel, attention_triton._key_mass_kernel):
        names = kernel.arg_names
        signature = {n: pointers.get(n, "fp32" if n == "scale" else "constexpr" if n.isupper() else "i32")
                     for n in names}
        constexprs = {(names.index(n),): v for n, v in constants.items() if n in names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        built = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
        assert built.asm["cubin"] and ".target sm_90" in built.asm["ptx"]
        assert built.metadata.shared <= 227 * 1024  # Hopper's shared memory per block: more fails at launch


def test_probe_on_cpu_keeps_the_chunked_path_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 37, 16, generator=g), torch.randn(2, 2, 37, 16, generator=g), torch.randn(2, 2, 37, 16)
    with AttentionMassProbe(chunk_size=5) as probe:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert probe.calls_by_kernel == {"chunked": 1}
    assert torch.equal(probe.mass, attention_mass(q, k, chunk_size=5))
    with pytest.raises(ValueError, match="not on a CUDA device"), AttentionMassProbe(kernel="triton"):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="kernel='fused' is not one of"):
        AttentionMassProbe(kernel="fused")


def test_kernel_module_and_probe_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, torch.nn.functional as F\n"
            "from pipeline.maths import attention_triton\n"
            "from pipeline.maths.attention import AttentionMassProbe\n"
            "q = torch.randn(1, 2, 5, 16)\n"
            "with AttentionMassProbe() as p: F.scaled_dot_product_attention(q, q, q)\n"
            "assert p.calls_by_kernel == {'chunked': 1} and not attention_triton.AVAILABLE\n"
            "print(attention_triton.unsupported(q, q))\n")
    done = _python("-c", code, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "triton is not installed"


def test_sink_stats_names_a_bad_mass_kernel():
    from callbacks.sink_stats import SinkStatsCallback

    assert SinkStatsCallback(mass_kernel="chunked").mass_kernel == "chunked"
    with pytest.raises(ValueError, match=r"SinkStatsCallback.mass_kernel='fused' is not one of"):
        SinkStatsCallback(mass_kernel="fused")
