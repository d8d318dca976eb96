"""Tables for people and dicts for JSON: the sparsity report and the dense-vs-pruned scores."""
from __future__ import annotations

import math

from rich.table import Table


def expected_row_zeros(in_features: int, sparsity: float, n_m: tuple[int, int] | None) -> int:
    if n_m is not None:
        return in_features // n_m[1] * n_m[0]
    return int(in_features * sparsity)


def sparsity_report(layers: dict, masks: dict, sparsity: float, n_m=None) -> dict:
    """Per-layer zeros in the actual weights (not just the masks), checked against the target per row."""
    rows, total_zeros, total = [], 0, 0
    for name, layer in layers.items():
        weight = layer.weight.detach()
        zeros_per_row = (weight == 0).sum(dim=1)
        expected = expected_row_zeros(weight.shape[1], sparsity, n_m)
        zeros = int(zeros_per_row.sum())
        rows.append({
            "layer": name,
            "shape": list(weight.shape),
            "zeros": zeros,
            "sparsity": zeros / weight.numel(),
            "pruned": name in masks,
            "rows_below_target": int((zeros_per_row < expected).sum()) if name in masks else None,
        })
        total_zeros += zeros
        total += weight.numel()
    ok = all(r["rows_below_target"] == 0 for r in rows if r["pruned"])
    return {"target": sparsity, "n_m": list(n_m) if n_m else None, "layers": rows,
            "total_sparsity": total_zeros / max(total, 1), "meets_target": ok}


def render_sparsity(report: dict, max_rows: int = 40) -> Table:
    target = f"{report['n_m'][0]}:{report['n_m'][1]}" if report["n_m"] else f"{report['target']:.0%}"
    table = Table(title=f"sparsity (target {target}; total {report['total_sparsity']:.2%}; "
                        f"{'meets target' if report['meets_target'] else '[red]BELOW TARGET[/]'})")
    for col in ("layer", "shape", "sparsity", "rows below target"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    rows = report["layers"]
    shown = rows if len(rows) <= max_rows else rows[: max_rows // 2] + rows[-max_rows // 2:]
    for r in shown:
        table.add_row(r["layer"], "x".join(map(str, r["shape"])), f"{r['sparsity']:.2%}", str(r["rows_below_target"]))
    if len(shown) < len(rows):
        table.add_row("…", "", "", f"({len(rows) - len(shown)} more in the JSON)")
    return table


def _fmt(value, stderr=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr else "")


def render_scores(dense: dict, pruned: dict, label: str) -> Table:
    """Held-out perplexity and task metrics, dense vs pruned, with the delta."""
    table = Table(title=f"dense vs pruned ({label})")
    for col in ("metric", "dense", "pruned", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, name in (("nll", "held-out NLL (nats/token)"), ("ppl", "held-out perplexity")):
        d = dense.get("heldout", {}).get(key)
        p = pruned.get("heldout", {}).get(key)
        table.add_row(name, _fmt(d), _fmt(p), _fmt(p - d) if d is not None and p is not None else "-")
    tasks = sorted(set(dense.get("tasks", {})) | set(pruned.get("tasks", {})))
    for task in tasks:
        dt, pt = dense.get("tasks", {}).get(task, {}), pruned.get("tasks", {}).get(task, {})
        for metric in sorted(set(dt) | set(pt)):
            if metric.endswith("_stderr"):
                continue
            d, p = dt.get(metric), pt.get(metric)
            table.add_row(
                f"{task} {metric}", _fmt(d, dt.get(metric + "_stderr")), _fmt(p, pt.get(metric + "_stderr")),
                _fmt(p - d) if isinstance(d, float) and isinstance(p, float) else "-",
            )
    return table

