"""Tables for people and dicts for JSON: the sparsity report and the dense-vs-pruned scores."""
from __future__ import annotations

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
    table = Table(title=f"sparsity (target {target}; total {report['total_sparsity']:.2%}; "
                        f"{'meets target' if report['meets_target'] else '[red]BELOW TARGET[/]'})",
                  caption="short layer names; full names in results.json")
    for col in ("layer", "shape", "sparsity", "rows < target"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    rows = report["layers"]
    shown = rows if len(rows) <= max_rows else rows[: max_rows // 2] + rows[-max_rows // 2:]
    for r in shown:
        table.add_row(short_layer_name(r["layer"]), "x".join(map(str, r["shape"])), f"{r['sparsity']:.2%}", str(r["rows_below_target"]))
    if len(shown) < len(rows):
        table.add_row("…", "", "", f"({len(rows) - len(shown)} more in the JSON)")
    return table


def render_scores(dense: dict, pruned: dict, label: str, paired: dict | None = None) -> Table:
    """Held-out masked-diffusion NLL and perplexity, dense vs pruned (same masks for both); with `paired`
    (pipeline.maths.metrics.paired_difference), the NLL difference's paired standard error."""
    table = Table(title=f"held-out perplexity, dense vs pruned ({label})")
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
