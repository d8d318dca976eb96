"""Sink summaries and pictures that the callback and the DLM-vs-AR report write: the per-timestep table of
SinkStatsCallback's records (`summarize_records`, `render_timestep_table`) and the PNG heatmap."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from rich.table import Table

from pipeline.maths.sinks import positional_sink, sink_position_variance


def summarize_records(records: dict) -> dict:
    """Per-timestep table and the sink-position variance across timesteps (the paper's metric)."""
    steps = sorted({step for _, step in records})
    samples = sorted({sid for sid, _ in records})
    seqlen = max(len(r["mass"]) for r in records.values())  # batches may differ in length (dynamic padding)
    rows, heat = [], []
    for step in steps:
        recs = [records[(sid, step)] for sid in samples if (sid, step) in records]
        positions = Counter(r["dominant_position"] for r in recs)
        kinds = Counter(r["dominant_kind"] for r in recs)
        heat.append(_mean_share(recs, seqlen))
        rows.append({
            "step": step,
            "t": recs[0]["t"],
            "samples": len(recs),
            "modal_dominant_position": positions.most_common(1)[0][0],
            "modal_position_fraction": positions.most_common(1)[0][1] / len(recs),
            "top1_share": sum(r["top1_share"] for r in recs) / len(recs),
            "normalized_entropy": sum(r["entropy"] for r in recs) / len(recs),
            "mean_sinks_per_sample": sum(r["n_sinks"] for r in recs) / len(recs),
            "dominant_kinds": dict(kinds.most_common()),
        })
    dominant = {sid: [records[(sid, s)]["dominant_position"] for s in steps if (sid, s) in records] for sid in samples}
    real_lengths = {_real_length(r) for r in records.values()}
    return {
        "sink_position_variance": sink_position_variance(list(dominant.values())),
        # 1/n for n real tokens; with padding or mixed lengths, the mean of 1/n over the records
        "uniform_share": (1.0 / real_lengths.pop() if len(real_lengths) == 1
                          else sum(1.0 / _real_length(r) for r in records.values()) / len(records)),
        "seqlen": seqlen,
        "samples": len(samples),
        "timesteps": rows,
        "mean_mass_by_timestep": heat,
        "positional_sink": positional_sink([r["dominant_position"] for r in records.values()],
                                           [r["dominant_kind"] for r in records.values()]),
    }


def positional_warning(found: dict) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in found["kinds"].items())
    what = (f"always the same kind of token ({kinds}: never masked? see keep_special_tokens)" if len(found["kinds"]) == 1
            else f"whatever token is there ({kinds}: a learned position embedding?)")
    return (f"warning: positional sink: the attention sink sits on absolute position {found['position']} in "
            f"{found['fraction']:.0%} of (window, timestep) pairs, {what}. It cannot move across timesteps, so "
            "sink-aware pruning acts like the AR recipe here; see docs/sinks.md")


def _real_length(rec: dict) -> int:
    valid = rec.get("valid")
    return len(rec["mass"]) if valid is None else int(valid.sum())


def _mean_share(recs: list[dict], seqlen: int) -> list:
    """Per position, the mean over records of its share of the record's mass, over the records where it
    is a real token: padding and positions past a shorter record's end are left out, not counted as 0.
    A position no record reaches is None (a blank heatmap cell)."""
    total = torch.zeros(seqlen, dtype=torch.float64)
    count = torch.zeros(seqlen, dtype=torch.float64)
    for r in recs:
        mass = r["mass"].double()
        valid = r.get("valid")
        valid = torch.ones(len(mass), dtype=torch.bool) if valid is None else valid
        share = torch.where(valid, mass, torch.zeros_like(mass))
        share = share / share.sum()
        total[: len(mass)] += torch.where(valid, share, torch.zeros_like(share))
        count[: len(mass)] += valid.double()
    return [float(t / c) if c else None for t, c in zip(total, count)]


def render_timestep_table(summary: dict) -> Table:
    table = Table(title=f"attention sinks per timestep (sink position variance {summary['sink_position_variance']:.2f})",
                  caption="top-1: largest share of attention mass; pos.: modal sink position (share of windows); "
                          "entropy: normalized", caption_justify="left")
    rows = [[f"{r['t']:.2f}", f"{r['top1_share']:.3f}", f"{r['top1_share'] / summary['uniform_share']:.1f}x",
             f"{r['normalized_entropy']:.3f}", str(r["modal_dominant_position"]), f"{r['modal_position_fraction']:.0%}",
             f"{r['mean_sinks_per_sample']:.2f}", ", ".join(f"{k} {v}" for k, v in list(r["dominant_kinds"].items())[:3])]
            for r in summary["timesteps"]]
    for i, col in enumerate(("t", "top-1", "×unif.", "entropy", "pos.", "same", "sinks")):  # numbers are never cut ...
        table.add_column(col, justify="right", no_wrap=True, min_width=max([len(col), *(len(row[i]) for row in rows)]))
    table.add_column("sink tokens", overflow="fold")  # ... the token kinds wrap instead, at any width
    for row in rows:
        table.add_row(*row)
    return table


def plot_heatmap(matrix, path, title: str = "", ylabels=None, xlabel: str = "key position",
                 ylabel: str = "timestep t (mask rate)", log: bool = True) -> Path:
    """Save `matrix` [timesteps x positions] as a PNG heatmap (NaN cells blank).  Callers write it inside an
    AtomicDir temp folder, which makes it atomic with the rest of their output."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, without touching pyplot's state
    from matplotlib.figure import Figure

    data = torch.as_tensor(matrix, dtype=torch.float32).cpu().numpy()
    if data.ndim != 2:
        raise ValueError(f"heatmap matrix must be 2-D [timesteps, positions]; got shape {data.shape}")
    rows, cols = data.shape
    fig = Figure(figsize=(min(16, 3 + cols * 0.12), min(12, 1.5 + rows * 0.3)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = None
    positive = data[(data > 0) & ~torch.isnan(torch.as_tensor(data)).numpy()]
    if log and positive.size and positive.max() > positive.min():
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=max(float(positive.min()), float(positive.max()) * 1e-4), vmax=float(positive.max()))
        data = data.clip(min=norm.vmin)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    fig.colorbar(image, ax=ax, label="share of attention mass" + (" (log scale)" if norm is not None else ""))
    # each row's strongest position (its sink) marked
    finite = torch.nan_to_num(torch.as_tensor(data), nan=-1.0)
    if cols > 1:
        ax.scatter(finite.argmax(dim=1).numpy(), range(rows), marker="x", color="red", s=18, label="row max (sink)")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylabels is not None:
        labels = list(ylabels)
        stride = max(1, math.ceil(len(labels) / 30))
        ax.set_yticks(range(0, len(labels), stride), labels[::stride])
    ax.set_title(title)
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
