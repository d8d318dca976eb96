"""This project against the reference (VILA-Lab/Sink-Aware-Pruning) on one CUDA GPU, at LLaDA-8B's layer shapes.

    git clone https://github.com/VILA-Lab/Sink-Aware-Pruning /tmp/sap
    SINKPRUNE_REFERENCE=/tmp/sap python benchmarks/vs_reference_cuda.py --json benchmarks/results/vs_reference_cuda.json
    python benchmarks/vs_reference_cuda.py --markdown benchmarks/results/vs_reference_cuda.json      # docs table
    SINKPRUNE_REFERENCE=/tmp/sap python benchmarks/vs_reference_cuda.py --tiny --device cpu        # a CPU smoke run
    OUT=benchmarks/results SUITE_SECONDS=540 bash benchmarks/gpu_suite.sh speed    # issue #23's run: phases, budget

The model is the reference's own `model/modeling_llada.py` (imported from the clone, never vendored) at LLaDA-8B's
shapes: d_model 4096, 32 heads, MLP 12288, vocabulary 126464, the first `--layers` (4) blocks, random bf16 weights
built in GPU memory.  Both sides see the same random token windows, 10 timesteps, batch size 1.  One process builds
the model once; before every run the block weights are restored from a pristine copy, so each run prunes the same
dense model.  Rows, per T (default T = 2048 with 16 windows and T = 4096 with 8):

  floor               plain forwards of the same noised windows (windows × timesteps forwards, no statistic)
  reference           the reference's `prune_sink` / `prune_sink_sparsegpt`
  default             this project, default flavour (SinkStatsCallback + PruneCallback, one-shot)
  reference-flavour   this project, flavor=reference (the reference's operations; sequential SparseGPT)
  default-sequential  this project, default flavour, sequential SparseGPT (the LLaDA-8B recipes' mode)
  default-host-totals the default row with one-shot SparseGPT's float64 totals forced into host memory
                      (SINKPRUNE_SLOT_TOTALS=host: the least device memory, the fold on the CPU)

Reported: the median over `--repeats` of the pruning call's seconds (synchronised; model building excluded; this
project's time is PruneCallback's calibration + masks), peak `torch.cuda.max_memory_allocated` (the model's weights
included, as on both sides), ratios to the reference and to the floor, and mask agreement with the reference next to
its noise floor (the reference against itself with another seed).  With the fused mass kernel available, the sink
sets (s >= 0.5) of the fused and the chunked probe are compared on the benchmark's own noised windows.
Sink Wanda runs at every T first, then sink SparseGPT; within each, the first repeat, the noise floor and the extra
runs come before the other repeats, and the JSON is rewritten after every run, so a run cut short keeps what it did.
`--phases METHOD...`: one more, instrumented run of each of this project's rows of those methods, its seconds per
phase (setup, noising, probed forward, mass kernel, sink scores, statistic accumulation, slot fold, solve, other:
`PhaseClock`); `--profile METHOD...`: one more run of the default row under torch.profiler (the longest kernels, and
their sum against the run's time: how busy the device was); `--budget-s`: skip what would carry the script past it
(benchmarks/gpu_suite.sh sets it from the step's limit).

Nothing here needs lm-eval, datasets, jsonargparse or gensim: the reference's `lib/data.py` imports `datasets` at
module level, so a stand-in module is registered before it is imported (its loader is replaced by the windows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

MASK_ID = 126336
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464, embedding_size=126464)
TINY = dict(d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden_size=384, vocab_size=126464, embedding_size=126464)
COMMON = dict(block_type="llama", rope=True, rope_theta=500000.0, layer_norm_type="rms", rms_norm_eps=1e-5,
              activation_type="silu", attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0,
              weight_tying=False, include_bias=False, include_qkv_bias=False, mask_token_id=MASK_ID, pad_token_id=126081,
              eos_token_id=126081, flash_attention=False, scale_logits=False, alibi=False)
REFERENCE_FN = {"sink_wanda": "prune_sink", "sink_sparsegpt": "prune_sink_sparsegpt"}
# (flavor, SparseGPT mode); sink Wanda is one-shot in every configuration
CONFIGS = {"default": ("default", "oneshot"), "reference-flavour": ("reference", "sequential"),
           "default-sequential": ("default", "sequential"), "default-host-totals": ("default", "oneshot")}
SLOT_TOTALS = {"default-host-totals": "host"}  # SINKPRUNE_SLOT_TOTALS for that row (one-shot's float64 totals in host memory)


def reference_dir() -> Path:
    ref = os.environ.get("SINKPRUNE_REFERENCE")
    if not ref or not (Path(ref) / "lib" / "prune_llada.py").is_file():
        sys.exit("set SINKPRUNE_REFERENCE to a clone of github.com/VILA-Lab/Sink-Aware-Pruning (it has lib/prune_llada.py)")
    return Path(ref)


def import_reference(ref: Path):
    """The reference's pruning module and model classes, with a stand-in `datasets` (only its loader uses it)."""
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            stand_in = types.ModuleType("datasets")
            stand_in.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no datasets in this benchmark"))
            sys.modules["datasets"] = stand_in
    sys.path.insert(0, str(ref))
    if not torch.cuda.is_available():  # CPU smoke runs: lib/sparsegpt.py synchronises unconditionally
        torch.cuda.synchronize = lambda *a, **k: None
    import lib.prune_llada as P
    from model import LLaDAConfig, LLaDAModelLM
    return P, LLaDAConfig, LLaDAModelLM


# --- the model and the windows -----------------------------------------------------------------------------------

def build_model(LLaDAConfig, LLaDAModelLM, dims: dict, layers: int, max_len: int, device: torch.device, dtype, seed: int):
    config = LLaDAConfig(**dims, **COMMON, n_layers=layers, max_sequence_length=max_len, init_device=str(device))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LLaDAModelLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(device=device, dtype=dtype)  # LLaDA's init may place some modules on its own init device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random weights at a trained model's scale (norms stay at 1)
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, device=device, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    model.eval().requires_grad_(False)
    model.hf_device_map = {}  # the reference's sparsegpt path reads it
    if not hasattr(model.config, "use_cache"):  # transformers 5 configs no longer default it; the reference reads it
        model.config.use_cache = False
    return model


def block_linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".blocks." in n}


def snapshot(model) -> dict[str, torch.Tensor]:
    """The dense block weights, on the CPU (pinned when CUDA), to restore before each run."""
    out = {}
    for n, m in block_linears(model).items():
        t = m.weight.detach().to("cpu", copy=True)
        out[n] = t.pin_memory() if m.weight.is_cuda else t
    return out


def restore(model, dense: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, m in block_linears(model).items():
            m.weight.copy_(dense[n], non_blocking=True)
    sync(model)


def sync(model=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_windows(n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random token windows (ids below the mask token), the same on both sides."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, MASK_ID - 1, (n, seqlen), generator=g)


# --- one run of each side ----------------------------------------------------------------------------------------

def measured(fn, device: torch.device):
    """(seconds, peak bytes, result) of fn(), synchronised; peak = torch.cuda.max_memory_allocated (0 on CPU).
    fn returns (result, end): end is when the pruning was done (perf_counter), or None for when fn returned."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    result, end = fn()
    sync()
    seconds = (end or time.perf_counter()) - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, peak, result


def noised(windows: torch.Tensor, timesteps: int, device: torch.device, seed: int):
    """[1, T] noised windows, each at every timestep, as the reference noises them (global RNG, eps 1e-3)."""
    torch.manual_seed(seed)
    for w in windows:
        ids = w[None].to(device)
        for step in range(1, timesteps + 1):
            p = (1 - 1e-3) * step / timesteps + 1e-3
            yield torch.where(torch.rand(ids.shape, device=device) < p, torch.tensor(MASK_ID, device=device), ids)


def run_floor(model, windows: torch.Tensor, timesteps: int, device: torch.device, seed: int):
    """Plain forwards of the noised windows."""
    with torch.no_grad():
        for noisy in noised(windows, timesteps, device, seed):
            model(input_ids=noisy, use_cache=False)
    return None


def run_reference(P, model, windows: torch.Tensor, method: str, timesteps: int, device: torch.device, seed: int):
    samples = [(w[None].clone(), w[None].clone()) for w in windows]
    P.get_loaders = lambda name, nsamples=128, seed=0, seqlen=2048, tokenizer=None: (samples[:nsamples], None)
    P.tqdm = _quiet_tqdm
    model.seqlen = windows.shape[1]
    args = SimpleNamespace(nsamples=len(samples), seed=seed, sparsity_ratio=0.5, use_variant=False, calib_dataset="wikitext2",
                           diffusion_steps=5 * timesteps, sample_interval=5, batch_size=1, noise_eps=1e-3,
                           sink_std=2.0, sink_alpha=5.0, prune_method=method)
    torch.manual_seed(seed)  # as main_llada.py seeds before pruning
    getattr(P, REFERENCE_FN[method])(args, model, SimpleNamespace(mask_token_id=MASK_ID), device, prune_n=0, prune_m=0)
    return {n: (m.weight == 0).cpu() for n, m in block_linears(model).items()}


class _quiet_tqdm:  # the reference's progress bars would interleave with this table
    def __init__(self, iterable=(), *a, **k):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, *a):
        pass

    def close(self):
        pass


def run_project(model, windows: torch.Tensor, method: str, config: str, timesteps: int, device: torch.device, seed: int,
                workdir: Path):
    import lightning as L

    from callbacks.prune import PruneCallback
    from callbacks.sink_stats import SinkStatsCallback
    from pipeline.model.data import CalibrationData
    from pipeline.model.module import DLMModule

    flavor, mode = CONFIGS[config]
    module = DLMModule(pretrained="tiny-llada", timesteps=timesteps, seed=seed)
    module.model, module.tokenizer, module.mask_token_id = model, None, MASK_ID  # configure_model keeps a set model
    prune = PruneCallback(method=method, sparsity=0.5, mode="oneshot" if method == "sink_wanda" else mode,
                          flavor="reference-exact" if flavor == "reference" else flavor)  # (the reference's noise order too)
    done = _PruningDone()  # after PruneCallback's hooks: the masks are in place; Lightning's teardown comes after
    trainer = L.Trainer(max_epochs=1, accelerator=device.type if device.type == "cpu" else "gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SinkStatsCallback(record=False, heatmap=False), prune, done], default_root_dir=str(workdir))
    # the project's own loader: in one process SparseGPT's windows arrive slot by slot (one Hessian slot alive)
    forced = SLOT_TOTALS.get(config)
    if forced:
        os.environ["SINKPRUNE_SLOT_TOTALS"] = forced
    try:
        trainer.fit(module, datamodule=CalibrationData.from_windows(windows, batch_size=1))
    finally:
        if forced:
            os.environ.pop("SINKPRUNE_SLOT_TOTALS")
    model.to(device)  # the strategy's teardown moved the module to the CPU
    return {n: m.to(torch.bool).cpu() for n, m in prune.masks.items()}, done.at


def _PruningDone():
    import lightning as L

    class PruningDone(L.Callback):
        at = None

        def on_train_end(self, trainer, pl_module):
            sync()
            self.at = time.perf_counter()

    return PruningDone()


def agreement(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise RuntimeError(f"the two sides pruned different layers: {sorted(set(a) ^ set(b))[:4]}")
    return sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)


def sink_sets_equal(model, windows: torch.Tensor, timesteps: int, device: torch.device, seed: int) -> dict | None:
    """Sink sets (s >= 0.5) of the fused probe against the chunked one on the benchmark's noised windows."""
    import inspect

    from pipeline.maths.attention import AttentionMassProbe
    from pipeline.maths.sinks import sink_scores

    if "kernel" not in inspect.signature(AttentionMassProbe).parameters:
        return None
    same = total = 0
    worst = 0.0
    with torch.no_grad():
        for noisy in noised(windows, timesteps, device, seed):
            masses = {}
            for kernel in ("triton", "chunked"):
                with AttentionMassProbe(kernel=kernel) as probe:
                    model(input_ids=noisy, use_cache=False)
                masses[kernel] = probe.mass
            worst = max(worst, float((masses["triton"] - masses["chunked"]).abs().max() / masses["chunked"].abs().max()))
            sets = {k: sink_scores(m) >= 0.5 for k, m in masses.items()}
            same += int((sets["triton"] == sets["chunked"]).all())
            total += 1
    return {"windows_equal": same, "windows": total, "max_rel_mass_difference": worst}


# --- phases of one run (--phases) --------------------------------------------------------------------------------

PHASES = ("setup", "noising", "probed forward", "mass kernel", "sink scores", "statistic accumulation", "slot fold",
          "solve", "other")


class PhaseClock:
    """Seconds of one run spent in each phase, exclusive of the phases inside it (the mass kernel inside the probed
    forward, the slot fold inside the statistic accumulation).  The device is synchronised at every phase boundary, so
    each phase holds its own device work; that removes the overlap of host and device work across boundaries, so the
    instrumented run is slower than a timed one (both are reported).  "setup" runs from the run's start to
    PruneCallback.on_train_start (Lightning's setup, the callbacks' fit-start forwards); "other" is what no phase
    holds (Lightning's loop and hooks, the epoch's end outside the solve)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.calls, self.stack = device, dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0), []
        self.patches: list[tuple] = []
        self.start = self.train_start = None

    def now(self) -> float:
        sync()
        return time.perf_counter()

    def enter(self, name: str) -> None:
        self.stack.append([name, self.now(), 0.0])

    def leave(self) -> None:
        name, t0, inner = self.stack.pop()
        spent = self.now() - t0
        self.seconds[name] += spent - inner
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += spent

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.leave()

        self.patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def wrap_generator(self, owner, attr: str, name: str) -> None:
        """A generator function whose every next() is the phase (the noised batches are made lazily, one per step)."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            items = original(*args, **kwargs)
            while True:
                self.enter(name)
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self.leave()
                yield item

        self.patches.append((owner, attr, original))
        setattr(owner, attr, timed)

    def install(self) -> "PhaseClock":
        import pipeline.maths.attention as attention
        import pipeline.model.module as module
        from callbacks.prune import PruneCallback
        from callbacks.reduction import SlotSums
        from callbacks.sink_stats import SinkStatsCallback

        self.wrap_generator(module, "noised_batches", "noising")
        self.wrap_generator(module, "reference_noised_batches", "noising")
        self.wrap(SinkStatsCallback, "on_noised_batch_start", "probed forward")
        for kernel in ("triton_attention_mass", "attention_mass"):  # (looked up in the module at every call)
            self.wrap(attention, kernel, "mass kernel")
        self.wrap(attention.reference, "collector_attention_mass", "mass kernel")
        self.wrap(SinkStatsCallback, "_publish", "sink scores")
        self.wrap(PruneCallback, "on_noised_batch", "statistic accumulation")
        self.wrap(SlotSums, "fold", "slot fold")
        self.wrap(PruneCallback, "_solve", "solve")
        original = PruneCallback.on_train_start

        def train_start(cb, *args, **kwargs):
            self.train_start = self.now()
            return original(cb, *args, **kwargs)

        self.patches.append((PruneCallback, "on_train_start", original))
        PruneCallback.on_train_start = train_start
        self.start = self.now()
        return self

    def remove(self) -> None:
        for owner, attr, original in reversed(self.patches):
            setattr(owner, attr, original)
        self.patches = []

    def report(self, total: float) -> dict:
        seconds = dict(self.seconds)
        seconds["setup"] = (self.train_start - self.start) if self.train_start else 0.0
        seconds["other"] = max(0.0, total - sum(v for k, v in seconds.items() if k != "other"))
        return {"seconds": {k: round(v, 4) for k, v in seconds.items()}, "calls": dict(self.calls, setup=1),
                "instrumented_total_s": round(total, 4)}


def measure_phases(a, model, dense, windows, method: str, config: str, device, workdir) -> dict:
    """One instrumented run of this project (not among the timed ones): seconds per phase."""
    restore(model, dense)
    clock = PhaseClock(device).install()
    try:
        seconds, _, _ = measured(lambda: run_project(model, windows, method, config, a.timesteps, device, a.seed, workdir),
                                 device)
    finally:
        clock.remove()
    return {"method": method, "run": config, **clock.report(seconds)}


def profile_kernels(a, model, dense, windows, method: str, config: str, device, workdir, top: int = 15) -> dict:
    """One run under torch.profiler: the device kernels taking the most time and their sum (how busy the device was);
    on a CPU (a smoke run) the operators by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    restore(model, dense)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        seconds, _, _ = measured(lambda: run_project(model, windows, method, config, a.timesteps, device, a.seed, workdir),
                                 device)
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # microseconds
    events = [e for e in prof.key_averages() if spent(e) > 0 and (not cuda or e.device_type.name == "CUDA")]
    events.sort(key=spent, reverse=True)
    return {"method": method, "run": config, "what": "device kernels" if cuda else "CPU operators (own time)",
            "profiled_total_s": round(seconds, 4), "kernel_s": round(sum(spent(e) for e in events) / 1e6, 4),
            "kernels": [{"name": e.key[:120], "calls": e.count, "seconds": round(spent(e) / 1e6, 5)} for e in events[:top]]}


# --- the table ---------------------------------------------------------------------------------------------------

WARM: set = set()  # (side, config, T) warmed up in this process


class Budget:
    """The script's own time limit (--budget-s): a repeat, a phase run or a check is skipped when the time it took
    before would carry the script past it, so a device call's limit leaves a finished JSON."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def allows(self, estimate: float) -> bool:
        return self.end is None or time.perf_counter() + estimate <= self.end


def section_rows(sec: dict) -> list[dict]:
    """The rows of one (T, methods) section from what has run so far (medians of the runs there are)."""
    runs, masks, floors, seqlen, nwin = sec["runs"], sec["masks"], sec["floors"], sec["T"], sec["windows"]
    med = {job: statistics.median(s for s, _ in v) for job, v in runs.items() if v}
    peak = {job: statistics.median(p for _, p in v) for job, v in runs.items() if v}
    floor = ("floor", None, None)
    rows = []
    if floor in med:
        rows.append({"T": seqlen, "windows": nwin, "method": None, "run": "floor", "seconds": med[floor],
                     "peak_gib": peak[floor] / 2**30, "seconds_all": [round(s, 3) for s, _ in runs[floor]]})
    for job in sec["jobs"]:
        side, method, config = job
        if side == "floor" or job not in med:
            continue
        ref = ("reference", method, None)
        both = job in masks and ref in masks
        rows.append({
            "T": seqlen, "windows": nwin, "method": method, "run": "reference" if side == "reference" else config,
            "seconds": med[job], "peak_gib": peak[job] / 2**30,
            "x_reference": med[job] / med[ref] if ref in med else None, "x_floor": med[job] / med[floor] if floor in med else None,
            "memory_x_reference": peak[job] / peak[ref] if peak.get(ref) else None,
            "agreement": None if side == "reference" or not both else agreement(masks[job], masks[ref]),
            "agreement_floor": floors.get(method), "seconds_all": [round(s, 3) for s, _ in runs[job]],
        })
    return rows


def measure_section(a, P, model, dense, seqlen: int, nwin: int, methods: list[str], device: torch.device, workdir: Path,
                    budget: Budget, save) -> dict:
    """Timed runs of one T for `methods` (medians of --repeats, the reference's noise floor after the first repeat),
    then the --phases / --profile runs and the sink-set check; `save(sec)` after every run."""
    windows = make_windows(nwin, seqlen, a.seed)
    jobs = [("floor", None, None)]
    for method in methods:
        jobs.append(("reference", method, None))
        for config in a.configs if method == "sink_wanda" else a.sparsegpt_configs:
            if method == "sink_wanda" and config in ("default-sequential", "default-host-totals"):
                continue  # sink Wanda is one-shot in every configuration and keeps no Hessian
            jobs.append(("project", method, config))
    sec = {"T": seqlen, "windows": nwin, "methods": methods, "jobs": jobs, "runs": {job: [] for job in jobs}, "masks": {},
           "floors": {}, "phases": [], "profile": [], "sink_sets": None}
    # one untimed warm-up, on one window, of the floor and the first sides whose forward has not run at this T in this
    # process (CUDA context, cuBLAS and cuDNN plans for these shapes, the reference's torch.compile, Triton's JIT).
    # SparseGPT after sink Wanda at the same T: the reference's and the default one-shot share those forwards (its
    # solver's first calls, well under a second, stay in its first run, which is counted once in a median of 3)
    for job in [("floor", None, None)] + [j for j in jobs if j[0] != "floor"][:3 if methods == ["sink_wanda"] else 2]:
        if (job[0], job[2], seqlen) in WARM:
            continue
        WARM.add((job[0], job[2], seqlen))
        restore(model, dense)
        _one(a, P, model, windows[:1], *job, device, workdir)
    repeats = a.sparsegpt_repeats or a.repeats if methods == ["sink_sparsegpt"] else a.repeats
    for rep in range(repeats):
        order = jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]  # rotate, so no side always runs first
        for job in order:
            if not budget.allows(max((s for s, _ in sec["runs"][job]), default=0.0)):
                print(f"  T={seqlen} rep {rep} {job}: skipped (--budget-s)", flush=True)
                continue
            restore(model, dense)
            seconds, peak, result = measured(lambda: _one(a, P, model, windows, *job, device, workdir), device)
            sec["runs"][job].append((seconds, peak))
            if rep == 0 and result is not None:
                sec["masks"][job] = result
            print(f"  T={seqlen} rep {rep} {job[0]:>9} {job[1] or '':>14} {job[2] or '':>18} {seconds:8.2f} s "
                  f"{peak / 2**30:6.2f} GiB", flush=True)
            save(sec)
        if rep == 0:  # after the first repeat, before the others: what a cut-short run must still hold
            _noise_floors(a, P, model, dense, windows, methods, sec, device, workdir, budget, save)
            _extra_runs(a, model, dense, windows, jobs, sec, device, workdir, budget, save)
    restore(model, dense)
    if device.type == "cuda" and "sink_wanda" in methods and budget.allows(10):
        try:
            sec["sink_sets"] = sink_sets_equal(model, windows[: a.sink_windows], a.timesteps, device, a.seed)
        except Exception as exc:  # noqa: BLE001 - noted; the sections after it still run
            sec.setdefault("errors", []).append(f"sink sets: {exc!r}"[:500])
        save(sec)
    restore(model, dense)
    return sec


def _noise_floors(a, P, model, dense, windows, methods, sec, device, workdir, budget, save) -> None:
    """The reference against itself with another seed: the noise floor of every agreement figure."""
    for method in methods:
        ref = sec["runs"][("reference", method, None)]
        if not ref or not budget.allows(ref[0][0]):
            continue
        restore(model, dense)
        other, _ = _one(a, P, model, windows, "reference", method, None, device, workdir, seed=a.seed + 1)
        sec["floors"][method] = agreement(other, sec["masks"][("reference", method, None)])
        save(sec)


def _extra_runs(a, model, dense, windows, jobs, sec, device, workdir, budget, save) -> None:
    """--phases and --profile: one instrumented run of each of this project's rows of those methods."""
    for job in jobs:
        side, method, config = job
        if side != "project" or method not in a.phases or not sec["runs"][job]:
            continue
        estimate = 2 * max(s for s, _ in sec["runs"][job])
        try:  # (a failing extra run is noted; the timed rows after it still run)
            if budget.allows(estimate):
                sec["phases"].append(measure_phases(a, model, dense, windows, method, config, device, workdir))
                print(render_phases(sec["T"], sec["phases"][-1]), flush=True)
                save(sec)
            if method in a.profile and config == "default" and budget.allows(estimate):
                sec["profile"].append(profile_kernels(a, model, dense, windows, method, config, device, workdir))
                save(sec)
        except Exception as exc:  # noqa: BLE001
            sec.setdefault("errors", []).append(f"{method} {config}: {exc!r}"[:500])
            print(f"  T={sec['T']} extra run of {method} {config} failed: {exc!r}", flush=True)
            save(sec)


def render_phases(seqlen: int, ph: dict) -> str:
    total = ph["instrumented_total_s"]
    out = [f"  T={seqlen} phases of {ph['method']} {ph['run']} (instrumented run {total:.2f} s): " +
           ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in ph["seconds"].items() if v > 0)]
    return "\n".join(out)


def _one(a, P, model, windows, side, method, config, device, workdir, seed=None):
    seed = a.seed if seed is None else seed
    if side == "floor":
        return run_floor(model, windows, a.timesteps, device, seed), None
    if side == "reference":
        return run_reference(P, model, windows, method, a.timesteps, device, seed), None
    return run_project(model, windows, method, config, a.timesteps, device, seed, workdir)


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def render_markdown(doc: dict) -> str:
    meta = doc["meta"]
    widths = "toy widths (--tiny)" if meta.get("tiny") else "LLaDA-8B shapes"
    out = [f"{meta['device']}, torch {meta['torch']}, {meta['layers']} blocks at {widths}, {meta['dtype'].replace('torch.', '')}, "
           f"{meta['timesteps']} timesteps, batch 1, median of {meta['repeats']} (SparseGPT rows: "
           f"{meta.get('sparsegpt_repeats', meta['repeats'])})",
           "", "| T, windows | method | run | pruning call (runs) | x reference | x floor | peak GPU memory | x reference | "
           "mask agreement (reference vs itself) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["run"] == "floor":
            out.append(f"| {r['T']}, {r['windows']} | | floor: plain forwards | {r['seconds']:.2f} s | | 1.00 | "
                       f"{r['peak_gib']:.1f} GiB | | |")
            continue
        agree = "—" if r["agreement"] is None else f"{r['agreement']:.2%}"
        noise = "—" if r["agreement_floor"] is None else f"{r['agreement_floor']:.2%}"
        out.append(f"| {r['T']}, {r['windows']} | {r['method']} | {r['run']} | {r['seconds']:.2f} s ({len(r['seconds_all'])}) | "
                   f"{_ratio(r['x_reference'])} | {_ratio(r['x_floor'])} | {r['peak_gib']:.1f} GiB | "
                   f"{_ratio(r['memory_x_reference'])} | {agree} ({noise}) |")
    phases = [(sec["T"], ph) for sec in doc.get("sections", []) for ph in sec.get("phases", [])]
    if phases:
        out += ["", "| T | run | " + " | ".join(PHASES) + " | instrumented total | timed (median) |",
                "|---|---|" + "---|" * (len(PHASES) + 2)]
        timed = {(r["T"], r["method"], r["run"]): r["seconds"] for r in doc["rows"]}
        for T, ph in phases:
            med = timed.get((T, ph["method"], ph["run"]))
            out.append(f"| {T} | {ph['method']} {ph['run']} | " + " | ".join(f"{ph['seconds'].get(k, 0):.2f}" for k in PHASES)
                       + f" | {ph['instrumented_total_s']:.2f} s | {'—' if med is None else f'{med:.2f} s'} |")
    for sec in doc.get("sections", []):
        for pr in sec.get("profile", []):
            out += ["", f"T = {sec['T']}, {pr['method']} {pr['run']} under torch.profiler: {pr['kernel_s']:.2f} s of "
                    f"{pr.get('what', 'device kernels')} in a {pr['profiled_total_s']:.2f} s run; the longest:", "",
                    "| kernel | calls | seconds |", "|---|---|---|"]
            out += [f"| `{k['name']}` | {k['calls']} | {k['seconds']:.3f} |" for k in pr["kernels"]]
    for s in doc.get("sections", []):
        for error in s.get("errors") or []:
            out.append(f"\nT = {s['T']}: failed: {error}")
        if s.get("sink_sets"):
            k = s["sink_sets"]
            out.append(f"\nT = {s['T']}: sink sets (s >= 0.5) fused vs chunked probe equal in {k['windows_equal']} of "
                       f"{k['windows']} noised windows (largest mass difference {k['max_rel_mass_difference']:.1e} of the largest mass)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=None, help="default 2048 4096 (--tiny: 64 128)")
    ap.add_argument("--windows", type=int, nargs="+", default=None, help="windows per sequence length (default 16 8; --tiny: 4 2)")
    ap.add_argument("--sparsegpt-seqlens", type=int, nargs="+", default=None, help="default the first of --seqlens")
    ap.add_argument("--methods", nargs="+", default=["sink_wanda", "sink_sparsegpt"], choices=list(REFERENCE_FN))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="this project's runs of sink Wanda")
    ap.add_argument("--sparsegpt-configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="this project's runs of sink SparseGPT")
    ap.add_argument("--phases", nargs="*", default=[], choices=list(REFERENCE_FN),
                    help="one more, instrumented run of this project's rows of these methods: seconds per phase (PhaseClock)")
    ap.add_argument("--profile", nargs="*", default=[], choices=list(REFERENCE_FN),
                    help="one more run under torch.profiler of these methods' default rows (with --phases): the longest kernels")
    step = os.environ.get("SUITE_STEP_SECONDS")  # (benchmarks/gpu_suite.sh: this step's limit, less the exit's margin)
    ap.add_argument("--budget-s", type=float, default=float(step) - 20 if step else None,
                    help="the script's own time limit: repeats and extra runs that would pass it are skipped "
                         "(default: SUITE_STEP_SECONDS - 20 under benchmarks/gpu_suite.sh, else none)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sparsegpt-repeats", type=int, default=None, help="repeats of the SparseGPT rows (default --repeats)")
    ap.add_argument("--sink-windows", type=int, default=4, help="windows of the fused-vs-chunked sink-set check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy widths (a smoke run of the script, e.g. on a CPU)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "vs_reference_cuda.json")
    ap.add_argument("--markdown", type=Path, default=None, help="render a --json file as a markdown table and exit")
    a = ap.parse_args()
    if a.markdown:
        print(render_markdown(json.loads(a.markdown.read_text())))
        return
    a.seqlens = a.seqlens or ([64, 128] if a.tiny else [2048, 4096])
    a.windows = a.windows or ([4, 2] if a.tiny else [16, 8])
    a.sparsegpt_seqlens = a.sparsegpt_seqlens or a.seqlens[:1]
    if len(a.windows) != len(a.seqlens):
        sys.exit(f"--windows has {len(a.windows)} values for {len(a.seqlens)} --seqlens; give one per sequence length")
    if missing := sorted(set(a.sparsegpt_seqlens) - set(a.seqlens)):
        sys.exit(f"--sparsegpt-seqlens {missing} are not among --seqlens {a.seqlens}; give lengths of --seqlens")
    budget = Budget(a.budget_s)  # (from here: the imports, the model and every run count)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a smoke run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):  # the Trainer's banner on every run
        logging.getLogger(name).setLevel(logging.WARNING)
    P, LLaDAConfig, LLaDAModelLM = import_reference(reference_dir())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(LLaDAConfig, LLaDAModelLM, TINY if a.tiny else LLADA_8B, a.layers, max(a.seqlens), device, dtype, a.seed)
    dense = snapshot(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {a.layers} blocks, {'tiny' if a.tiny else 'LLaDA-8B'} widths, "
          f"weights {sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30:.2f} GiB", flush=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "vs_reference_cuda"
    workdir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {"device": name, "torch": torch.__version__, "layers": a.layers, "tiny": a.tiny, "timesteps": a.timesteps,
                    "repeats": a.repeats, "sparsegpt_repeats": a.sparsegpt_repeats or a.repeats, "seed": a.seed, "dtype": str(dtype),
                    "budget_s": a.budget_s}, "rows": [], "sections": []}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []

    def save(current: dict | None = None) -> None:
        """The JSON after every run (written whole, then renamed): a run stopped at its time limit keeps the rest."""
        sections = done + ([current] if current is not None else [])
        doc["rows"] = [r for sec in sections for r in section_rows(sec)]
        doc["sections"] = [{k: sec.get(k) for k in ("T", "windows", "methods", "phases", "profile", "sink_sets", "floors",
                                                    "errors")} for sec in sections]
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(a.json)

    # sink Wanda at every length first, then sink SparseGPT (the longest runs) where asked
    sections = [(T, n, [m for m in a.methods if m == "sink_wanda"]) for T, n in zip(a.seqlens, a.windows)]
    sections += [(T, n, ["sink_sparsegpt"]) for T, n in zip(a.seqlens, a.windows)
                 if "sink_sparsegpt" in a.methods and T in a.sparsegpt_seqlens]
    for seqlen, nwin, methods in sections:
        if not methods:
            continue
        if not budget.allows(0):
            print(f"  T={seqlen} {methods}: skipped (--budget-s)", flush=True)
            continue
        done.append(measure_section(a, P, model, dense, seqlen, nwin, methods, device, workdir, budget, save))
        save()
    print(render_markdown(doc))


if __name__ == "__main__":
    main()
