"""Tables for people and dicts for JSON: the sparsity report and the dense-vs-pruned scores."""
from __future__ import annotations

import math

from rich.table import Table


def expected_row_zeros(in_features: int, sparsity: float, n_m: tuple[int, int] | None) -> int:
    if n_m is not None:
        return in_features // n_m[1] * n_m[0]
    return int(in_features * sparsity)


def _check_layer(weight, zeros_per_row, target: float, promise: str, n_m) -> tuple[int | None, bool]:
    """(rows below the row target or None, whether the layer keeps the solver's promise; pipeline/run/outcome.py)."""
    if promise in ("row", "n:m"):
        below = int((zeros_per_row < expected_row_zeros(weight.shape[1], target, n_m)).sum())
        return below, below == 0
    zeros = int(zeros_per_row.sum())
    if promise == "layer":  # one threshold per column block prunes at least int(numel · target) in all
        return None, zeros >= int(weight.numel() * target)
    return None, abs(zeros / weight.numel() - target) <= 0.01  # "about"


def sparsity_report(outcome) -> dict:
    """Per-layer zeros in the actual weights (not just the masks), checked against each layer's target as the
    solver promises it (outcome.promise): per row, per N:M group, or over the layer."""
    rows, total_zeros, total = [], 0, 0
    for name, layer in outcome.layers.items():
        weight = layer.weight.detach()
        zeros_per_row = (weight == 0).sum(dim=1)
        zeros, pruned = int(zeros_per_row.sum()), name in outcome.masks
        below, meets = _check_layer(weight, zeros_per_row, outcome.targets[name], outcome.promise, outcome.n_m)
        rows.append({"layer": name, "shape": list(weight.shape), "zeros": zeros, "sparsity": zeros / weight.numel(),
                     "target": outcome.targets[name], "pruned": pruned,
                     "rows_below_target": below if pruned else None, "meets_target": meets if pruned else None})
        total_zeros += zeros
        total += weight.numel()
    ok = all(r["meets_target"] for r in rows if r["pruned"])
    return {"target": outcome.sparsity, "n_m": list(outcome.n_m) if outcome.n_m else None, "promise": outcome.promise,
            "per_layer": len(set(outcome.targets.values())) > 1, "layers": rows,
            "total_sparsity": total_zeros / max(total, 1), "meets_target": ok}


SHORT = {"self_attn": "attn", "attention": "attn", "mlp": "mlp", "query": "q", "key": "k", "value": "v",
         "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "attn_out": "o", "ff_out": "ff.out",
         "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "intermediate": "ff.in", "output": "out",
         "dense": "", "self": "", "ff_proj": "ff.in", "up_proj_": "up", "experts": "e"}
DROP = {"model", "transformer", "bert", "encoder", "layer", "layers", "blocks", "h", "decoder"}


def short_layer_name(name: str) -> str:
    """`bert.encoder.layer.0.attention.self.query` -> `0.attn.q` (full names stay in the JSON)."""
    parts = [SHORT.get(p, p) for p in name.split(".") if p not in DROP]
    out = ".".join(p for p in parts if p)
    return out.replace("attn.out", "attn.o").replace("out.out", "out") or name


def render_sparsity(report: dict, max_rows: int = 40) -> Table:
    target = f"{report['n_m'][0]}:{report['n_m'][1]}" if report["n_m"] else f"{report['target']:.0%}"
    target = f"per layer, average {target}" if report.get("per_layer") else target
    promise = {"row": "per row", "n:m": "per group", "layer": "per layer", "about": "per layer ±1%"}[report["promise"]]
    table = Table(title=f"sparsity (target {target}, {promise}; total {report['total_sparsity']:.2%}; "
                        f"{'meets target' if report['meets_target'] else '[red]BELOW TARGET[/]'})",
                  caption="short layer names; full names in results.json")
    for col in ("layer", "shape", "target", "sparsity", "rows < target" if report["promise"] in ("row", "n:m") else "check"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    rows = report["layers"]
    shown = rows if len(rows) <= max_rows else rows[: max_rows // 2] + rows[-max_rows // 2:]
    for r in shown:
        check = str(r["rows_below_target"]) if r["rows_below_target"] is not None else \
            {True: "ok", False: "[red]below[/]", None: "-"}[r["meets_target"]]
        table.add_row(short_layer_name(r["layer"]), "x".join(map(str, r["shape"])), f"{r['target']:.2%}",
                      f"{r['sparsity']:.2%}", check)
    if len(shown) < len(rows):
        table.add_row("…", "", "", "", f"({len(rows) - len(shown)} more in the JSON)")
    return table


def quantize_line(summary: dict, report: dict, mask_zeros: int, saved_bytes: int | None = None,
                  dense_bytes: int | None = None, dense_dtype: str = "") -> str:
    """One console line for a quantized run: the scheme (results.json's "quantize"), the sizes once saved, and
    the zeros beyond the masks (weights that round to code 0), which lift the sparsity table's total above the
    target."""
    scheme = summary["scheme"]
    if scheme == "w4a16":
        grid = f"int4, group {summary['group_size']}" if summary["group_size"] else "int4, per channel"
    else:
        grid = "float8 e4m3, per channel"
    line = f"quantized: {scheme} {summary['algorithm'].upper()} {grid}, {summary['layers']} layers"
    if summary.get("saved_dense"):
        line += f" ({summary['saved_dense']} fused expert layers saved dense)"
    if saved_bytes is not None:
        line += f"; saved in compressed-tensors format, {saved_bytes / 2**20:.1f} MiB"
        if dense_bytes:
            line += f" (dense {dense_dtype} {dense_bytes / 2**20:.1f} MiB)"
    total = sum(r["zeros"] for r in report["layers"]), sum(math.prod(r["shape"]) for r in report["layers"])
    extra = total[0] - mask_zeros
    if extra > 0:
        line += (f"; {extra / max(total[1], 1):.2%} of the weights outside the masks round to 0, so the total "
                 f"sparsity ({report['total_sparsity']:.2%}) is above the pruned share")
    return line


def render_scores(dense: dict, pruned: dict, label: str, paired: dict | None = None, quantized: str | None = None) -> Table:
    """Held-out masked-diffusion NLL and perplexity, dense vs pruned (same masks for both; `quantized`: the scheme
    the pruned weights are also quantized to); with `paired` (pipeline.maths.metrics.paired_difference), the NLL
    difference's paired standard error."""
    table = Table(title=f"held-out perplexity, dense vs pruned{f' + {quantized}' if quantized else ''} ({label})")
    for col in ("metric", "dense", "pruned", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for key, name in (("nll", "NLL (nats/token)"), ("ppl", "perplexity")):
        d = dense.get("heldout", {}).get(key)
        p = pruned.get("heldout", {}).get(key)
        cells = [f"{v:.4f}" if v is not None else "-" for v in (d, p)]
        delta = f"{p - d:+.4f}" if d is not None and p is not None else "-"
        if key == "nll" and paired and paired.get("stderr") is not None:
            delta += f" ± {paired['stderr']:.4f}" + (" (noise)" if paired.get("within_noise") else "")
        table.add_row(name, *cells, delta)
    if paired and paired.get("stderr") is not None:
        table.caption = f"± paired s.e. over {paired['windows']} windows, same masks for both"
    return table
