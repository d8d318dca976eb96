"""This project against the reference implementation (VILA-Lab/Sink-Aware-Pruning), side by side.

    git clone https://github.com/VILA-Lab/Sink-Aware-Pruning /tmp/sap
    SINKPRUNE_REFERENCE=/tmp/sap python benchmarks/vs_reference.py --json benchmarks/results/vs_reference.json
    python benchmarks/vs_reference.py --markdown benchmarks/results/vs_reference.json     # README's table

The first command is README's whole table in one invocation: T = 128 and 512, sink_wanda and sink_sparsegpt, this
project's configurations `reference` (flavor=reference), `reference-noise` (flavor=reference-exact, i.e. noise_order=
"reference"): the reference's bits, reported as "identical (+weights)" when every mask entry and the sha256 of every
pruned weight match), `default` (the default flavour at its recipes' mode: one-shot), `default-sequential` (an extra
row) and `probes-only` (the floor of any schedule: the probed forwards alone), 3 repeats, cold and warm, peak RSS, mask
agreement and the reference's floor.  Nothing of the reference is shipped or vendored: the clone is imported from SINKPRUNE_REFERENCE at
run time.  A tiny checkpoint is built from the reference's own `model/modeling_llada.py` (whose SDPA wrapper is a
module-level `@torch.compile()`), with the trained weights of tiny-llada (same parameter names), and saved with
that remote code, so that this project loads exactly what the reference runs.  Both sides see the same
token windows (the reference's `get_loaders` is replaced by them) and 10 timesteps t = 0.1 … 1.0; the noise
differs (the reference draws it from the global torch RNG, this project from per-(sample, step) seeds) unless the
`reference-noise` configuration replays the reference's order.

Every run is a fresh process (one thread by default), so that peak RSS is per run (VmHWM: the process's own peak)
and the compile cache can be cold (an empty TORCHINDUCTOR_CACHE_DIR) or warm (the same directory again).  The sides
alternate within each repeat (the order rotates).  Reported: median seconds of the pruning call (model loading
excluded; this project's figure is PruneCallback's calibration time, probed + hooked passes + masks), the ratio this
project / reference, peak RSS, and mask agreement with the reference (fraction of equal mask entries over every pruned
Linear), next to the floor: the reference against itself with another seed (other noise, same windows).

Where the reference cannot run on CPU it is patched around here, never edited: `torch.cuda.synchronize()`
(SparseGPT) becomes a no-op and `Tensor.cuda()` (magnitude's global sort) returns the tensor itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("sink_wanda", "sink_sparsegpt", "wanda", "sparsegpt", "magnitude")
REFERENCE_FN = {"sink_wanda": "prune_sink", "sink_sparsegpt": "prune_sink_sparsegpt", "wanda": "prune_wanda",
                "sparsegpt": "prune_sparsegpt", "magnitude": "prune_magnitude"}
# The reference's LLaDA-8B settings at tiny-llada's size (tiny-llada's weights load into it unchanged).
TINY = dict(d_model=192, n_heads=4, n_kv_heads=2, n_layers=4, mlp_hidden_size=512, vocab_size=4096, embedding_size=4096,
            block_type="llama", rope=True, rope_theta=10000.0, layer_norm_type="rms", rms_norm_eps=1e-5,
            activation_type="silu", attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
            weight_tying=False, include_bias=False, max_sequence_length=512, mask_token_id=2, pad_token_id=3,
            eos_token_id=1, init_device="cpu", flash_attention=False)


def reference_dir() -> Path:
    ref = os.environ.get("SINKPRUNE_REFERENCE")
    if not ref or not (Path(ref) / "lib" / "prune_llada.py").is_file():
        sys.exit("set SINKPRUNE_REFERENCE to a clone of github.com/VILA-Lab/Sink-Aware-Pruning (it has lib/prune_llada.py)")
    return Path(ref)


# --- setup (parent) -------------------------------------------------------------------------------------

def build_checkpoint(ref: Path, out: Path) -> Path:
    """The reference's LLaDA code at tiny-llada's size, tiny-llada's trained weights, saved as remote code."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(ref))
    from model import LLaDAConfig, LLaDAModelLM

    zoo = REPO / "pipeline" / "zoo" / "tiny_llada"
    model = LLaDAModelLM(LLaDAConfig(**TINY))
    missing, unexpected = model.load_state_dict(load_file(str(zoo / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny-llada's weights do not fit the reference's LLaDA: missing {missing}, unexpected {unexpected}")
    model.config.auto_map = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"}
    model.config.architectures = ["LLaDAModelLM"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("configuration_llada.py", "modeling_llada.py"):
        shutil.copy2(ref / "model" / name, out / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(zoo / name, out / name)
    return out


def make_windows(nsamples: int, seqlen: int, seed: int):
    """Random windows of the embedded Wikipedia text (tiny-llada's tokenizer), as the reference picks them."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.model.corpus import wiki_split
    from pipeline.model.data import token_stream

    tok = AutoTokenizer.from_pretrained(str(REPO / "pipeline" / "zoo" / "tiny_llada"))
    stream = token_stream(tok, wiki_split("train"))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen - 1, (nsamples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


# --- one run (worker process) -------------------------------------------------------------------------------

def _rss_mib(field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (this process's peak since exec: getrusage's ru_maxrss would carry the forking parent's
    peak over into the child, which made every run report the parent's RSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_reference(ref: Path, ckpt: Path, windows, method: str, seed: int, timesteps: int):
    import numpy as np
    import torch

    sys.path.insert(0, str(ref))
    import lib.prune_llada as P
    from model import LLaDAModelLM

    torch.cuda.synchronize = lambda *a, **k: None      # lib/sparsegpt.py calls it unconditionally
    if method == "magnitude":
        torch.Tensor.cuda = lambda self, *a, **k: self  # prune_magnitude sorts the weights on "cuda"
    model = LLaDAModelLM.from_pretrained(str(ckpt), torch_dtype=torch.float32).eval()
    model.seqlen = windows.shape[1]
    model.hf_device_map = {}
    samples = [(w[None].clone(), w[None].clone()) for w in windows]
    P.get_loaders = lambda name, nsamples=128, seed=0, seqlen=2048, tokenizer=None: (samples[:nsamples], None)
    args = SimpleNamespace(nsamples=len(samples), seed=seed, sparsity_ratio=0.5, use_variant=False, calib_dataset="wikitext2",
                           diffusion_steps=5 * timesteps, sample_interval=5, batch_size=1, noise_eps=1e-3,
                           sink_std=2.0, sink_alpha=5.0, prune_method=method)
    np.random.seed(seed)
    torch.random.manual_seed(seed)                      # as main_llada.py does before pruning
    before = _rss_mib()
    t0 = time.perf_counter()
    getattr(P, REFERENCE_FN[method])(args, model, SimpleNamespace(mask_token_id=TINY["mask_token_id"]), torch.device("cpu"),
                                     prune_n=0, prune_m=0)
    seconds = time.perf_counter() - t0
    masks = {f"{n}": (m.weight == 0).cpu() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".blocks." in n}
    return seconds, before, masks, weights_digest(model)


def weights_digest(model) -> str:
    """sha256 over every block Linear's name and weight bytes, in name order: equal digests = the same pruned model."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for n, m in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(m, torch.nn.Linear) and ".blocks." in n:
            h.update(n.encode())
            h.update(m.weight.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_project(ckpt: Path, windows, method: str, seed: int, timesteps: int, mode: str, workdir: Path,
                flavor: str = "default", single_pass: bool = False, noise: str = "per_sample", eager: bool = True):
    import lightning as L
    import torch

    from callbacks.prune import PruneCallback
    from callbacks.sink_stats import SinkStatsCallback
    from pipeline.model.module import DLMModule

    from pipeline.maths.flavors import with_noise_order

    module = DLMModule(pretrained=str(ckpt), timesteps=timesteps, seed=seed)
    probes_only = flavor == "probes"  # the probed forwards alone (magnitude needs nothing of them: they stop early)
    method, flavor = ("magnitude", "default") if probes_only else (method, flavor)
    prune = PruneCallback(method=method, sparsity=0.5, mode=mode, flavor=with_noise_order(flavor, noise),
                          single_pass=single_pass, eager=eager)
    callbacks = ([SinkStatsCallback(record=False, heatmap=False)] if probes_only or method.startswith("sink_") else []) + [prune]
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        default_root_dir=str(workdir))
    loader = torch.utils.data.DataLoader([{"input_ids": w, "index": i, "keep": torch.zeros_like(w, dtype=torch.bool)}
                                          for i, w in enumerate(windows)], batch_size=1)
    before = _rss_mib()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.time() - prune.info["timings"]["calibration_start"]  # calibration + masks, model loading excluded
    masks = {n: m.to(torch.bool) for n, m in prune.masks.items()}
    return seconds, before, masks, weights_digest(module.model)


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    windows = torch.load(a.windows)
    with tempfile.TemporaryDirectory() as tmp:
        if a.side == "reference":
            seconds, before, masks, digest = run_reference(reference_dir(), Path(a.ckpt), windows, a.method, a.seed, a.timesteps)
        else:
            seconds, before, masks, digest = run_project(Path(a.ckpt), windows, a.method, a.seed, a.timesteps, a.mode, Path(tmp),
                                                 a.flavor, a.single_pass, a.noise, a.eager)
    peak = _rss_mib("VmHWM")
    torch.save(masks, a.out)
    Path(a.out + ".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before,
                                                 "weights_sha256": digest}))


# --- the comparison (parent) -----------------------------------------------------------------------------------

# this project's configurations: (flavor, mode for the SparseGPT methods, noise order); sink Wanda is one-shot in both
# flavours.  "default" is the default flavour at its recipes' mode (configs/method/sink_sparsegpt50.yaml: oneshot).
CONFIGS = {
    "reference": ("reference", "sequential", "per_sample"),
    "reference-noise": ("reference", "sequential", "reference"),  # the reference's noise order: bit-identical masks
    "default": ("default", "oneshot", "per_sample"),
    "default-sequential": ("default", "sequential", "per_sample"),  # an extra row: sink scores of the partly pruned model
    # the floor: the 160 probed forwards that give every (window, timestep)'s sink scores, stopping at the last
    # attention call, and nothing else (no statistic, no solve); every schedule of the paper's method runs them
    "probes-only": ("probes", "oneshot", "per_sample"),
}


def spawn(a, side: str, method: str, seqlen: int, seed: int, cache: Path, tag: str, config: str = "reference") -> dict:
    out = str(a.workdir / f"{side}-{config if side == 'project' else ''}-{method}-{seqlen}-{tag}.pt")
    flavor, mode, noise = CONFIGS[config]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TORCHINDUCTOR_CACHE_DIR=str(cache),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--worker", "--side", side, "--method", method, "--seed", str(seed),
           "--ckpt", str(a.workdir / "ckpt"), "--windows", str(a.workdir / f"windows-{seqlen}.pt"), "--out", out,
           "--timesteps", str(a.timesteps), "--threads", str(a.threads), "--flavor", flavor,
           "--noise", noise, "--single-pass" if a.single_pass else "--no-single-pass", "--eager" if a.eager else "--no-eager",
           "--mode", "oneshot" if method == "sink_wanda" else mode]  # the reference's sink Wanda is one-shot
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode:
        raise RuntimeError(f"{side} {config} {method} T={seqlen} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(Path(out + ".json").read_text()), "masks": out}


def agreement(a_path: str, b_path: str) -> tuple[float, int]:
    """(fraction of equal mask entries, number of differing entries) over every pruned Linear."""
    import torch

    a, b = torch.load(a_path), torch.load(b_path)
    if set(a) != set(b):
        raise RuntimeError(f"the two sides pruned different layers: {sorted(set(a) ^ set(b))[:4]}")
    same = sum(int((a[n] == b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    return same / total, total - same


def _configs_for(a, method: str) -> list[str]:
    """sink Wanda is one-shot in every configuration: its sequential variants would repeat the one-shot row; the
    probes-only floor is the same for both methods (shown under sink_sparsegpt)."""
    return [c for c in a.configs if not (method == "sink_wanda" and c in ("default-sequential", "probes-only"))]


def measure(a, method: str, seqlen: int) -> list[dict]:
    """The reference and every configuration, interleaved (the order rotates each repeat), cold (empty inductor cache)
    then warm, a.repeats times; the reference's runs are shared by the configurations' rows; then the floor."""
    sides = [("reference", None)] + [("project", c) for c in _configs_for(a, method)]
    runs = {(side, c, kind): [] for side, c in sides for kind in ("cold", "warm")}
    for rep in range(a.repeats):
        for side, config in sides[rep % len(sides):] + sides[:rep % len(sides)]:
            cache = Path(tempfile.mkdtemp(prefix="inductor-", dir=a.workdir))  # empty: cold
            for kind in ("cold", "warm"):
                runs[(side, config, kind)].append(spawn(a, side, method, seqlen, a.seed, cache, f"{kind}{rep}", config or "reference"))
            shutil.rmtree(cache, ignore_errors=True)
    floor = spawn(a, "reference", method, seqlen, a.seed + 1, a.workdir, "floor")
    ref_masks = runs[("reference", None, "warm")][0]["masks"]
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    rss = {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    floor_agreement = agreement(floor["masks"], ref_masks)[0]
    ref_digest = runs[("reference", None, "warm")][0]["weights_sha256"]
    rows = []
    for config in _configs_for(a, method):
        flavor, mode, noise = CONFIGS[config]
        rows.append({
            "T": seqlen, "method": method, "config": config, "flavor": flavor, "noise": noise,
            "mode": "oneshot" if method == "sink_wanda" else mode, "single_pass": a.single_pass, "eager": a.eager,
            "project_cold_s": med[("project", config, "cold")], "reference_cold_s": med[("reference", None, "cold")],
            "project_warm_s": med[("project", config, "warm")], "reference_warm_s": med[("reference", None, "warm")],
            "project_peak_rss_mib": rss[("project", config, "warm")], "reference_peak_rss_mib": rss[("reference", None, "warm")],
            **_agreement_fields(runs[("project", config, "warm")][0] if config != "probes-only" else None, ref_masks, ref_digest),
            "floor": floor_agreement,
            "seconds_all": {f"{s}/{k}": [round(r["seconds"], 3) for r in v] for (s, c, k), v in runs.items() if c in (None, config)},
        })
    return rows


def _agreement_fields(run: dict | None, ref_masks: str, ref_digest: str) -> dict:
    if run is None:
        return {"agreement": None, "mask_differences": None, "weights_identical": None}
    fraction, differences = agreement(run["masks"], ref_masks)
    return {"agreement": fraction, "mask_differences": differences, "weights_identical": run["weights_sha256"] == ref_digest}


def _agree_text(r: dict) -> str:
    if r["agreement"] is None:
        return "—"
    if r.get("mask_differences") == 0:
        return "identical" + (" (+weights)" if r.get("weights_identical") else "")
    return f"{r['agreement']:.2%}" + (f" ({r['mask_differences']} differ)" if r.get("mask_differences") else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["sink_wanda", "sink_sparsegpt"], choices=METHODS)
    ap.add_argument("--configs", nargs="+", default=["reference", "reference-noise", "default", "default-sequential", "probes-only"],
                    choices=list(CONFIGS),
                    help="this project's configurations, one row each: reference = flavor=reference (its schedule); "
                         "reference-noise = the same with the reference's noise order (bit-identical masks); default = "
                         "flavor=default at its recipes' mode (one-shot); default-sequential = the default flavour, "
                         "layer-sequential (sink scores of the partly pruned model at every timestep); probes-only = "
                         "the floor: the probed forwards alone, no statistic or solve")
    ap.add_argument("--single-pass", action=argparse.BooleanOptionalAction, default=True,
                    help="read the probed forward's Linear inputs, no second forward (PruneCallback's default)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="PruneCallback(eager=...): its hooked forwards in torch.compile's force_eager stance (default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--markdown", type=Path, default=None, help="render a --json file as README's table and exit")
    # worker-only arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--side", "--method", "--ckpt", "--windows", "--out", "--flavor", "--noise", "--mode"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.markdown:
        data = json.loads(a.markdown.read_text())
        return print(render_markdown(data["rows"], data["args"]))

    ref = reference_dir()
    import torch

    a.workdir = a.workdir or Path(tempfile.mkdtemp(prefix="sinkprune-vs-reference-"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    build_checkpoint(ref, a.workdir / "ckpt")
    for seqlen in a.seqlens:
        torch.save(make_windows(a.nsamples, seqlen, a.seed), a.workdir / f"windows-{seqlen}.pt")
    rev = subprocess.run(["git", "-C", str(ref), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = " ".join(["python", "benchmarks/vs_reference.py", *sys.argv[1:]])
    print(f"{command}\nreference {ref} @ {rev or '?'}; {a.nsamples} windows, {a.timesteps} timesteps, {a.threads} thread(s), "
          f"repeats {a.repeats}; configurations {', '.join(a.configs)}; load average {os.getloadavg()[0]:.2f}; "
          f"workdir {a.workdir}", flush=True)

    rows = []
    for seqlen in a.seqlens:
        for method in a.methods:
            for row in measure(a, method, seqlen):
                rows.append(row)
                print(render_row(row), flush=True)

    print()
    print(render_table(rows, a))
    if a.json:
        args = {**{k: str(v) for k, v in vars(a).items()}, "command": command, "reference_commit": rev,
                "load_average_end": os.getloadavg()[0]}
        a.json.write_text(json.dumps({"args": args, "rows": rows}, indent=1))


HEADER = (f"{'T':>4} {'method':15} {'config':19} {'cold s (proj/ref = ratio)':>28} {'warm s (proj/ref = ratio)':>28} "
          f"{'peak RSS MiB (proj/ref)':>24} {'masks agree':>11} {'ref floor':>9}")


def render_row(r: dict) -> str:
    cold = f"{r['project_cold_s']:.2f}/{r['reference_cold_s']:.2f} = {r['project_cold_s'] / r['reference_cold_s']:.2f}x"
    warm = f"{r['project_warm_s']:.2f}/{r['reference_warm_s']:.2f} = {r['project_warm_s'] / r['reference_warm_s']:.2f}x"
    rss = f"{r['project_peak_rss_mib']:.0f}/{r['reference_peak_rss_mib']:.0f} = {r['project_peak_rss_mib'] / r['reference_peak_rss_mib']:.2f}x"
    agree = _agree_text(r)
    return (f"{r['T']:>4} {r['method']:15} {r.get('config', r['flavor']):19} {cold:>28} {warm:>28} {rss:>24} "
            f"{agree:>10} {r['floor']:>9.2%}")


def render_table(rows: list[dict], a) -> str:
    lines = [f"this project vs reference, medians over {a.repeats} repeat(s) "
             "(cold = empty inductor cache, warm = the same cache again; each run a fresh process)", HEADER]
    lines += [render_row(r) for r in rows]
    lines.append("masks agree: this project vs the reference (same seed); ref floor: the reference vs itself with seed+1")
    return "\n".join(lines)


def render_markdown(rows: list[dict], args: dict) -> str:
    """README's table: one row per (T, configuration, method)."""
    label = {"reference": "reference", "reference-noise": "reference, `noise_order=\"reference\"`", "default": "default (one-shot)",
             "default-sequential": "default, `mode=sequential`", "probes-only": "floor: probed forwards only"}
    lines = [f"`{args.get('command', '')}` (repeats {args.get('repeats')}, load average at the end {args.get('load_average_end', '?')})", "",
             "| T | flavour | method | cold: this / reference (ratio) | warm: this / reference (ratio) | peak RSS | masks agree | ref. floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['T']} | {label.get(r.get('config'), r['flavor'])} | {r['method']} | "
            f"{r['project_cold_s']:.2f} / {r['reference_cold_s']:.2f} s (**{r['project_cold_s'] / r['reference_cold_s']:.2f}×**) | "
            f"{r['project_warm_s']:.2f} / {r['reference_warm_s']:.2f} s (**{r['project_warm_s'] / r['reference_warm_s']:.2f}×**) | "
            f"{r['project_peak_rss_mib'] / r['reference_peak_rss_mib']:.2f}× ({r['project_peak_rss_mib']:.0f} MiB) | "
            f"{_agree_text(r)} | {r['floor']:.2%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
