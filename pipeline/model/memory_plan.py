"""The memory plan: how a calibration run will use device and CPU memory, before any work (pure functions).

    shape = shape_from_config(json.load(open("config.json")))     # or shape_from_model(model)
    plan = memory_plan(shape, Calibration(...), device_free=80e9, cpu_free=1e12, devices=8)

Predicted peak bytes on one device:
  resident ("none"):     all weights + activations + statistics of every targeted layer (one-shot)
  offloaded (cpu/disk):  the largest of the run's phases (`offload_phases`), each with the cached block inputs when
                         the plan keeps them on the device (`block_inputs_on`):
    full forward         embeddings and head + 2 blocks (one running, the next prefetched): the short structural
                         forwards at fit start (8 tokens) and held-out scoring
    block inputs         embeddings (no untied head: the forward stops before the first block) + one batch's input
    statistics pass      2 blocks + activations + one batch's block input and output + the device statistics of one
                         block's layers (the head and embeddings are in CPU memory for the block passes)
    solve                2 blocks + the solver's workspace for the largest layer (one layer at a time)
  activations:           one batch through one block: B·T·(4·hidden + 3·widest MLP input) values in the model's dtype,
                         the statistic's float32 copy of the widest input B·T·widest, the attention-mass probe's fp32
                         chunk B·heads·chunk·T, the cached block input and output
  statistics:            per targeted Linear, Wanda a float64 vector [in], SparseGPT a float32 Hessian [in, in] per
                         reduction slot the rank owns, plus the float64 total (from a config.json: layers fed one
                         tensor share one statistic, as in the run; from a loaded model: one per Linear, an upper bound).
                         Offloaded with batches of one window, the windows go slot by slot and each completed slot
                         is folded into a float64 total in CPU memory (under DDP round by round, each slot broadcast
                         by its owner): one float32 Hessian per statistic on the device (+ the one crossing)
  solver workspace:      counted on the CPU (tests/test_offload.py): Wanda and magnitude 16 bytes per weight (fp32
                         scores, the weight in fp32, threshold masks, an int64 running count); SparseGPT 38 bytes per
                         Hessian entry (the float64 total brought to the device, its scaled copies, the Cholesky
                         factor and its inverse) + 22 per weight (the fp32 weight, its updates, the block's masks)
In CPU memory (per process; a node holds one process per device): "cpu" keeps every block (pinned), "disk" maps them
from the checkpoint (page cache, shared by the node's processes; a pruned block is written to a scratch file and
mapped back: the blocks' bytes on disk per process); with offload the embeddings and head have a pinned copy there
(they leave the device for the block passes), the block inputs of every calibration batch and timestep are cached
there (windows · timesteps · T · hidden values of the windows this rank holds) unless they fit on the device, and
SparseGPT's float64 totals of one block wait there (on every rank).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

HEADROOM = 0.9  # the fraction of a device's free memory a plan may use (allocator fragmentation, CUDA context)


@dataclass
class ModelShape:
    name: str
    blocks: int
    block_bytes: int                 # the largest block's weights
    resident_bytes: int              # everything else: embeddings, head, final norm, buffers
    hidden: int
    heads: int
    widest_input: int                # the widest Linear input inside a block (the MLP's down projection)
    linear_inputs: list[int] = field(default_factory=list)  # in_features of each statistic of the largest block
    dtype_bytes: int = 2
    all_blocks_bytes: int | None = None  # every block's weights (blocks differ: an MoE model's first dense ones)
    head_bytes: int = 0              # the output head's weights when not tied to the embeddings (part of resident_bytes)
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each Linear inside the blocks

    @property
    def model_bytes(self) -> int:
        return self.resident_bytes + (self.all_blocks_bytes if self.all_blocks_bytes is not None else self.blocks * self.block_bytes)


@dataclass
class Calibration:
    statistic: str | None = "act_sq_sum"  # None (magnitude), act_sq_sum / act_norm_sum (Wanda), hessian (SparseGPT)
    windows: int = 128
    timesteps: int = 10
    seqlen: int = 2048
    batch_size: int = 1
    reduction_slots: int = 8
    chunk_size: int = 128


def _first(config: dict, *keys, default=None):
    return next((config[k] for k in keys if config.get(k) is not None), default)


DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8, "fp32": 4, "bf16": 2}


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A model's shape from its config.json alone (LLaDA, LLaDA-MoE / LLaDA2 MoE, Llama/Qwen-like, Dream, SDAR).
    Raises ValueError naming the missing field."""
    config = {**config.get("text_config", {}), **config}
    hidden = _first(config, "hidden_size", "d_model", "n_embd")
    layers = _first(config, "num_hidden_layers", "n_layers", "num_layers")
    vocab = _first(config, "vocab_size", "embedding_size")
    heads = _first(config, "num_attention_heads", "n_heads")
    for field_name, value in (("hidden_size (or d_model)", hidden), ("num_hidden_layers (or n_layers)", layers),
                              ("vocab_size", vocab), ("num_attention_heads (or n_heads)", heads)):
        if value is None:
            raise ValueError(f"plan --model {name}: config.json has no {field_name}; give the model's own config.json")
    vocab = max(vocab, config.get("embedding_size") or 0)
    kv_heads = _first(config, "num_key_value_heads", "n_kv_heads", default=heads)
    head_dim = _first(config, "head_dim", default=hidden // heads)
    mlp = _first(config, "intermediate_size", "mlp_hidden_size", default=4 * hidden)
    if config.get("mlp_ratio") and not _first(config, "intermediate_size", "mlp_hidden_size"):
        mlp = int(config["mlp_ratio"] * hidden)
    dtype = str(_first(config, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
    # statistic inputs: q/k/v read one tensor, as do gate/up (one shared statistic each, callbacks/shared.py)
    attention = [hidden, heads * head_dim]
    attn_params = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    experts = _first(config, "num_experts", "n_routed_experts", "num_local_experts", default=0) or 0
    if experts:
        expert_mlp = _first(config, "moe_intermediate_size", "expert_intermediate_size", default=mlp)
        shared = _first(config, "num_shared_experts", "n_shared_experts", default=0) or 0
        inputs = attention + (experts + shared) * [hidden, expert_mlp]  # the router stays dense: no statistic
        block_params = attn_params + 3 * hidden * expert_mlp * (experts + shared) + hidden * experts
        widest = max(expert_mlp, heads * head_dim)
    else:
        inputs = attention + [hidden, mlp]
        block_params = attn_params + 3 * hidden * mlp
        widest = max(mlp, heads * head_dim)
    dense_first = min(int(_first(config, "first_k_dense_replace", default=0) or 0), int(layers)) if experts else 0
    dense_params = attn_params + 3 * hidden * mlp
    all_blocks = (dense_first * dense_params + (int(layers) - dense_first) * block_params + int(layers) * 2 * hidden)
    tied = bool(_first(config, "tie_word_embeddings", "weight_tying", default=False))
    resident_params = vocab * hidden * (1 if tied else 2) + hidden
    dtype_bytes = DTYPE_BYTES.get(dtype, 2)
    attention_shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (hidden, heads * head_dim)]
    mlps = ([expert_mlp] if experts else []) + ([mlp] if dense_first or not experts else [])
    shapes = attention_shapes + [s for m in mlps for s in ((m, hidden), (hidden, m))]
    return ModelShape(name, int(layers), int((max(block_params, dense_params) + 2 * hidden) * dtype_bytes),
                      int(resident_params * dtype_bytes), int(hidden), int(heads), int(widest), [int(i) for i in inputs],
                      dtype_bytes, int(all_blocks * dtype_bytes), 0 if tied else int(vocab * hidden * dtype_bytes),
                      [(int(o), int(i)) for o, i in shapes])


def shape_from_model(model, blocks, name: str = "model") -> ModelShape:
    """A loaded model's shape, measured (blocks: the transformer blocks, in order)."""
    import torch

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    block_ids = {id(p) for b in blocks for p in b.parameters()}
    sizes = [nbytes(b.parameters()) for b in blocks]
    largest = blocks[sizes.index(max(sizes))] if blocks else model
    inputs = [m.in_features for m in largest.modules() if isinstance(m, torch.nn.Linear)]
    config = getattr(model, "config", None)
    hidden = _first(vars(config) if config is not None else {}, "hidden_size", "d_model", default=max(inputs, default=1))
    heads = _first(vars(config) if config is not None else {}, "num_attention_heads", "n_heads", default=1)
    param = next(model.parameters())
    resident = nbytes(p for p in model.parameters() if id(p) not in block_ids) + nbytes(model.buffers())
    from pipeline.model.offload import _untied_head

    head = _untied_head(model)
    shapes = {tuple(m.weight.shape) for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    return ModelShape(name, len(blocks), max(sizes, default=0), resident, int(hidden), int(heads),
                      max(inputs, default=int(hidden)), inputs, param.element_size(),
                      head_bytes=nbytes(p for p in model.parameters() if id(p) in head), linear_shapes=sorted(shapes))


def activation_bytes(shape: ModelShape, cal: Calibration) -> int:
    tokens = cal.batch_size * cal.seqlen
    values = tokens * (4 * shape.hidden + 3 * shape.widest_input) * shape.dtype_bytes
    values += tokens * shape.widest_input * 4 if cal.statistic else 0  # the statistic's float32 copy of a layer input
    probe = cal.batch_size * shape.heads * min(cal.chunk_size, cal.seqlen) * cal.seqlen * 4 * 2  # scores + exp, fp32
    return int(values + probe)


def statistic_bytes(inputs: list[int], cal: Calibration, devices: int) -> int:
    """Statistics of the Linear layers with these input widths on one rank: owned slots + the float64 total."""
    if cal.statistic is None:
        return 0
    owned = math.ceil(cal.reduction_slots / devices)
    if cal.statistic == "hessian":
        return sum(i * i for i in inputs) * (4 * owned + 8)
    return sum(inputs) * 8 * (owned + 1)


def totals_fit(totals_bytes: int, device_free: int, transient_bytes: int) -> bool:
    """Whether float64 totals of this many bytes may live on the device: within HEADROOM of what it can still allocate,
    leaving room for the transient peak (a forward's activations) above what is held now."""
    return totals_bytes + transient_bytes <= device_free * HEADROOM


def offloaded_statistic_bytes(inputs: list[int], cal: Calibration, devices: int) -> tuple[int, int]:
    """(on the device, in CPU memory) for one block's SparseGPT statistics with offload.  Batches of one window go slot
    by slot and each completed slot is folded into a float64 total in CPU memory: one float32 slot per statistic
    alive.  Under DDP every rank's slots of a round are folded together, each broadcast by its owner (one more
    float32 slot, the largest, on the device while it crosses; every rank holds the totals in its CPU memory); with
    batches spanning slots the rank's owned slots wait on the device until the solve folds them.  One process with
    such batches adds its slots on the device at the solve (`statistic_bytes`)."""
    if cal.statistic != "hessian" or (devices == 1 and cal.batch_size > 1):
        return statistic_bytes(inputs, cal, devices), 0
    entries, largest = sum(i * i for i in inputs), max(inputs, default=0) ** 2
    alive = 1 if cal.batch_size == 1 else math.ceil(cal.reduction_slots / devices)
    return 4 * (entries * alive + (largest if devices > 1 else 0)), 8 * entries


# the solver's device workspace (counted on the CPU, tests/test_offload.py: an upper bound within a few percent when
# in >= out; over by up to a third for out >> in): bytes per weight of the layer being solved, per Hessian entry
WORKSPACE_PER_WEIGHT = {"hessian": 22, None: 16}
WORKSPACE_PER_HESSIAN_ENTRY = 38


def solver_bytes(shape: ModelShape, cal: Calibration) -> int:
    """Device workspace of solving one layer, the largest (one layer is solved at a time)."""
    shapes = shape.linear_shapes or [(shape.hidden, shape.widest_input)]
    if cal.statistic == "hessian":
        return max(WORKSPACE_PER_HESSIAN_ENTRY * i * i + WORKSPACE_PER_WEIGHT["hessian"] * o * i for o, i in shapes)
    return max(WORKSPACE_PER_WEIGHT[None] * o * i for o, i in shapes)


def offload_phases(shape: ModelShape, cal: Calibration, devices: int, cache_on_device: int = 0) -> dict[str, int]:
    """Predicted device bytes of each phase of an offloaded run (see the module's docstring)."""
    act = activation_bytes(shape, cal)
    blocks = 2 * shape.block_bytes  # (+ the buffers, which stay: a few KiB of RoPE tables)
    one_input = cal.batch_size * cal.seqlen * shape.hidden * shape.dtype_bytes
    stats, _ = offloaded_statistic_bytes(shape.linear_inputs, cal, devices)
    return {"full forward": shape.resident_bytes + 2 * shape.block_bytes,
            "block inputs": shape.resident_bytes - shape.head_bytes + one_input + cache_on_device,
            "statistics pass": blocks + act + 2 * one_input + stats + cache_on_device,
            # (under DDP with batches spanning slots, the slots of the block's other layers wait while one is solved)
            "solve": blocks + solver_bytes(shape, cal) + (stats if devices > 1 and cal.batch_size > 1 else 0) + cache_on_device}


def memory_plan(shape: ModelShape, cal: Calibration, *, device_free: int, cpu_free: int | None = None,
                devices: int = 1, offload: str = "auto") -> dict:
    """The chosen offload ("none", "cpu" or "disk") and the predicted peak bytes per device and in CPU memory.
    offload="auto" keeps the model resident when its peak fits HEADROOM of the device's free memory, else onloads
    block by block from CPU memory when the blocks and the cache fit there, else from disk."""
    act = activation_bytes(shape, cal)
    all_inputs = shape.linear_inputs * shape.blocks  # (an upper bound when blocks differ)
    resident_peak = shape.model_bytes + act + statistic_bytes(all_inputs, cal, devices)
    windows_here = math.ceil(cal.windows / devices)
    cache = windows_here * cal.timesteps * cal.seqlen * shape.hidden * shape.dtype_bytes
    blocks_bytes = shape.model_bytes - shape.resident_bytes
    budget = int(device_free * HEADROOM)
    # the cached block inputs stay on the device when every phase fits with them, else they wait in CPU memory
    phases = offload_phases(shape, cal, devices, cache)
    inputs_on = "device" if max(phases.values()) <= budget else "cpu"
    if inputs_on == "cpu":
        phases = offload_phases(shape, cal, devices)
    offload_peak = max(phases.values())
    hessians_device, hessians_cpu = offloaded_statistic_bytes(shape.linear_inputs, cal, devices)
    # CPU memory with offload, besides the blocks: the cache when it waits there, the pinned copy of the embeddings
    # and head, SparseGPT's float64 totals of one block
    offload_cpu = (cache if inputs_on == "cpu" else 0) + shape.resident_bytes + hessians_cpu
    if offload == "auto":  # (the processes of one node share its CPU memory: `devices` of them, at most)
        if resident_peak <= budget:
            offload = "none"
        elif cpu_free is None or devices * (blocks_bytes + offload_cpu) <= cpu_free * HEADROOM:
            offload = "cpu"
        else:
            offload = "disk"
    device_peak = resident_peak if offload == "none" else offload_peak
    cpu_peak = {"none": 0, "cpu": blocks_bytes + offload_cpu, "disk": offload_cpu}[offload]
    scratch = blocks_bytes if offload == "disk" else 0  # the pruned blocks, written to a temporary file and mapped
    fits = device_peak <= budget and (cpu_free is None or devices * cpu_peak <= cpu_free)
    stats_here = (statistic_bytes(all_inputs, cal, devices) if offload == "none" else
                  max(hessians_device, solver_bytes(shape, cal) if cal.statistic == "hessian" else 0))
    return {"fix": None if fits else plan_fix(offload, device_peak > budget, stats_here, act, cal),
            "model": shape.name, "model_bytes": shape.model_bytes, "block_bytes": shape.block_bytes,
            "resident_bytes": shape.resident_bytes, "blocks": shape.blocks, "devices": devices,
            "device_free_bytes": int(device_free), "cpu_free_bytes": None if cpu_free is None else int(cpu_free),
            "offload": offload, "predicted_device_peak_bytes": int(device_peak),
            "predicted_cpu_bytes": int(cpu_peak), "predicted_scratch_disk_bytes": int(scratch), "resident_device_peak_bytes": int(resident_peak),
            "offload_device_peak_bytes": int(offload_peak), "activation_bytes": act, "block_input_cache_bytes": int(cache),
            "block_inputs_on": inputs_on, "offload_phases": {k: int(v) for k, v in phases.items()},
            "solver_bytes": solver_bytes(shape, cal), "statistic_device_bytes": int(hessians_device),
            "statistic_cpu_bytes": int(hessians_cpu), "fits": bool(fits), "calibration": asdict(cal)}


def plan_fix(offload: str, device_short: bool, stats: int, act: int, cal: Calibration) -> str:
    """What to change when a plan does not fit (one clause)."""
    if not device_short:
        return "CPU memory is short: model.offload: disk (weights mapped from the checkpoint)"
    if offload == "none":
        return "model.offload: cpu (blocks onloaded one at a time)"
    if cal.statistic == "hessian" and stats >= act:
        # (batches of one window fold each slot at once: one float32 slot per statistic on any number of devices)
        spread = ("data.init_args.batch_size: 1 (one slot at a time), more devices (trainer.devices; the reduction slots "
                  "spread over them), fewer prune reduction_slots, " if cal.batch_size > 1 else "a device with more memory ")
        return f"SparseGPT's Hessians need {gib(stats)} (one block's, or the largest layer's solve): {spread}or method sink_wanda"
    return "a smaller data.init_args.batch_size or data.init_args.seqlen"


def gib(n: int | None) -> str:
    """Bytes in the largest binary unit that keeps a whole number in front (1.5 GiB, 12.0 MiB)."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render_plan(plan: dict) -> str:
    """The plan as a short table (one line per figure)."""
    rows = [("model", f"{plan['model']}: {gib(plan['model_bytes'])} ({plan['blocks']} blocks of {gib(plan['block_bytes'])}, "
                      f"{gib(plan['resident_bytes'])} embeddings and head)"),
            ("devices", f"{plan['devices']} x {gib(plan['device_free_bytes'])} free"),
            ("plan", f"offload={plan['offload']}" + ("" if plan["fits"] else "  (DOES NOT FIT)")),
            ("device peak", f"{gib(plan['predicted_device_peak_bytes'])} per device (resident would be "
                            f"{gib(plan['resident_device_peak_bytes'])}, offloaded {gib(plan['offload_device_peak_bytes'])})"),
            *([("phases", ", ".join(f"{k} {gib(v)}" for k, v in plan["offload_phases"].items())
                         + f"; block inputs on the {plan['block_inputs_on']}")] if plan["offload"] != "none" else []),
            *([("statistics", f"{gib(plan['statistic_device_bytes'])} on the device per block"
                              + (f" (float64 totals: {gib(plan['statistic_cpu_bytes'])} in CPU memory)" if plan["statistic_cpu_bytes"] else "")
                              + f"; solving the largest layer {gib(plan['solver_bytes'])}")] if plan["offload"] != "none" else []),
            ("CPU memory", f"{gib(plan['predicted_cpu_bytes'])} per process (block-input cache {gib(plan['block_input_cache_bytes'])})"
                           + (f", {gib(plan['predicted_cpu_bytes'] * plan['devices'])} for {plan['devices']} on one node"
                              if plan["devices"] > 1 else ""))]
    if plan.get("predicted_scratch_disk_bytes"):
        rows.append(("scratch disk", f"{gib(plan['predicted_scratch_disk_bytes'])} per process (the pruned blocks, mapped)"))
    if plan.get("fix"):
        rows.append(("fix", plan["fix"]))
    if plan.get("measured_device_peak_bytes") is not None:
        rows.append(("measured", f"{gib(plan['measured_device_peak_bytes'])} peak on the device"))
    import textwrap

    width = max(len(k) for k, _ in rows)  # values wrap under themselves: the console is 80 columns
    return "\n".join(textwrap.fill(v, 80, initial_indent=f"{k:<{width}}  ", subsequent_indent=" " * (width + 2),
                                    break_long_words=False, break_on_hyphens=False) for k, v in rows)


def parse_bytes(text: str) -> int:
    """'80GB', '2GiB', '512MiB', '1e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgtib")
    unit = value[len(number):]
    if unit not in units:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GB, 2GiB or 1e9")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GB, 2GiB or 1e9") from None
