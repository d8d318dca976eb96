"""SinkStatsCallback: attention mass per token at every calibration timestep, and the sink scores.

For each noised batch (see pipeline/model/calibration.py) it runs one probed forward, sums the attention
probability each key receives over queries, heads and layers, and publishes
    nb.sink_scores = sigmoid(alpha · (mass − (mean + k·std)))      (per sample, over positions)
for PruneCallback to down-weight sink tokens.  During the first epoch it also records per-(sample,
timestep) diagnostics; at the epoch's end it gathers them across ranks and rank 0 writes
`sinks.json` (per-timestep table, sink-position variance across timesteps) and `sink_heatmap.png`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table

from pipeline.model.calibration import NoisedBatch, calibration_forward, forward_through_blocks, last_block
from callbacks.reduction import gather_records
from pipeline.maths.attention import AttentionMassProbe
from pipeline.run.outputs import AtomicDir
from pipeline.maths.sinks import mass_statistics, plot_heatmap, sink_position_variance, sink_scores, token_kind


class SinkStatsCallback(Callback):
    def __init__(
        self,
        sink_std: float = 2.0,
        sink_alpha: float = 5.0,
        per_layer: bool = False,
        chunk_size: int = 128,
        out_dir: str | None = None,
        heatmap: bool = True,
        record: bool = True,
        overwrite: bool = False,
    ):
        for name, value in (("sink_std", sink_std), ("sink_alpha", sink_alpha)):
            if not math.isfinite(value):
                raise ValueError(f"SinkStatsCallback.{name}={value} is not finite; use a finite number (defaults: sink_std 2.0, sink_alpha 5.0)")
            if value <= 0:
                raise ValueError(f"SinkStatsCallback.{name}={value} must be > 0 (a sink lies sink_std standard deviations "
                                 "above the mean mass; defaults: sink_std 2.0, sink_alpha 5.0)")
        if chunk_size < 1:
            raise ValueError(f"SinkStatsCallback.chunk_size={chunk_size} must be >= 1 (queries per softmax chunk; default 128)")
        self.overwrite = overwrite
        self.sink_std, self.sink_alpha = float(sink_std), float(sink_alpha)
        self.per_layer, self.chunk_size = per_layer, chunk_size
        self.out_dir, self.heatmap, self.record = out_dir, heatmap, record
        self.records: dict[tuple[int, int], dict] = {}
        self.summary: dict | None = None
        self._stop_after: torch.nn.Module | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Fail in seconds, not after the dense scoring, when the probe cannot see the model's attention."""
        ids = torch.full((1, 8), int(pl_module.mask_token_id), dtype=torch.long, device=pl_module.device)
        with torch.no_grad(), AttentionMassProbe(chunk_size=self.chunk_size) as probe:
            calibration_forward(pl_module, ids)
        probe.require_attention(pl_module.model)
        self._stop_after = last_block(pl_module.model)  # the probed forwards need no LM head

    # --- per noised batch --------------------------------------------------------------------------
    def on_noised_batch_start(self, trainer, pl_module, nb: NoisedBatch) -> None:
        valid = nb.attention_mask.bool() if nb.attention_mask is not None else None
        with AttentionMassProbe(per_layer=self.per_layer, chunk_size=self.chunk_size, query_weights=valid) as probe:
            forward_through_blocks(pl_module, nb.input_ids, nb.attention_mask, stop_after=self._stop_after)
        probe.require_attention()
        mass = probe.mass
        if not torch.isfinite(mass).all():
            where = _locate_nonfinite_attention(pl_module, nb, valid, self.chunk_size)
            raise FloatingPointError(
                f"attention mass has NaN/Inf at timestep t={nb.t} (samples {nb.sample_ids}){where}; "
                "check the model's dtype and inputs"
            )
        nb.sink_scores = sink_scores(mass, k=self.sink_std, alpha=self.sink_alpha, valid=valid)
        nb.extras["attention_mass"] = mass
        if self.per_layer:
            nb.extras["attention_mass_per_layer"] = probe.per_layer
        if self.record and trainer.current_epoch == 0:
            self._record(pl_module, nb, mass, probe.per_layer if self.per_layer else None, valid)

    def _record(self, pl_module, nb, mass, per_layer, valid):
        stats = mass_statistics(mass, valid=valid)
        tokenizer = getattr(pl_module, "tokenizer", None)
        for b, sample_id in enumerate(nb.sample_ids):
            if sample_id < 0:  # DDP padding
                continue
            if valid is not None and not valid[b].any():
                continue  # all padding: no token, no attention to describe (and no weight in any statistic)
            pos = int(stats["dominant_position"][b])
            token = int(nb.input_ids[b, pos])
            rec = {
                "t": nb.t,
                "mass": mass[b].float().cpu(),
                "valid": None if valid is None else valid[b].cpu(),
                "dominant_position": pos,
                "top1_share": float(stats["top1_share"][b]),
                "entropy": float(stats["normalized_entropy"][b]),
                "dominant_kind": token_kind(token, tokenizer, pl_module.mask_token_id),
                "n_sinks": int((nb.sink_scores[b] > 0.5).sum()),
            }
            if per_layer is not None:
                rec["layer_dominant"] = [int(m[b].argmax()) for m in per_layer]
            self.records[(sample_id, nb.step)] = rec

    # --- end of the calibration epoch ----------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.record or trainer.current_epoch != 0:
            return
        records = gather_records(self.records)
        if not records:
            return
        self.summary = summarize(records)
        if trainer.is_global_zero:
            with AtomicDir(self.output_path(trainer), overwrite=self.overwrite) as tmp:
                (tmp / "sinks.json").write_text(json.dumps(self.summary, indent=1))
                if self.heatmap:
                    heat = torch.tensor([[math.nan if v is None else v for v in row] for row in self.summary["mean_mass_by_timestep"]])
                    labels = [f"t={row['t']:.2f}" for row in self.summary["timesteps"]]
                    plot_heatmap(heat, tmp / "sink_heatmap.png", title="attention mass (mean over samples)", ylabels=labels)
            Console().print(render_table(self.summary))

    def output_path(self, trainer) -> Path:
        return Path(self.out_dir or Path(trainer.default_root_dir) / "sinks").expanduser()

    def state_dict(self) -> dict:
        return {"records": self.records, "summary": self.summary}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = state_dict.get("records", {})
        self.summary = state_dict.get("summary")


class _LocatingProbe(AttentionMassProbe):
    """Also notes, for every attention call, the innermost module running at that moment."""

    def __init__(self, stack: list[str], **kwargs):
        super().__init__(per_layer=True, **kwargs)
        self.stack, self.modules = stack, []

    def _record(self, *args, **kwargs):
        super()._record(*args, **kwargs)
        self.modules.append(self.stack[-1] if self.stack else "?")


def _locate_nonfinite_attention(pl_module, nb: NoisedBatch, valid, chunk_size: int) -> str:
    """Error path only: re-run the probed forward per attention call and name the first module whose
    attention mass is NaN/Inf (its queries or keys already are), e.g. ", first in attention call 3 of 6
    (bert.encoder.layer.3.attention.self)"; "" if the re-run finds nothing."""
    stack: list[str] = []

    def leave(module, args, output) -> None:  # returns None: the module's output is left as it is
        stack.pop()

    handles = []
    for name, module in pl_module.model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), _LocatingProbe(stack, chunk_size=chunk_size, query_weights=valid) as probe:
            calibration_forward(pl_module, nb.input_ids, nb.attention_mask)
    except Exception:  # noqa: BLE001 - a diagnostic must not replace the error it explains
        return ""
    finally:
        for h in handles:
            h.remove()
    for i, layer_mass in enumerate(probe.per_layer):
        if not torch.isfinite(layer_mass).all():
            return f", first in attention call {i} of {probe.calls} ({probe.modules[i] or 'the model itself'})"
    return ""


def summarize(records: dict) -> dict:
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
    }


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


def render_table(summary: dict) -> Table:
    table = Table(title=f"attention sinks per timestep (sink-position variance across timesteps: {summary['sink_position_variance']:.2f})")
    for col in ("t", "top-1 share", "vs uniform", "norm. entropy", "modal sink pos.", "same pos.", "sinks/sample", "sink tokens"):
        table.add_column(col, justify="right")
    for r in summary["timesteps"]:
        kinds = ", ".join(f"{k} {v}" for k, v in list(r["dominant_kinds"].items())[:3])
        table.add_row(
            f"{r['t']:.2f}", f"{r['top1_share']:.3f}", f"{r['top1_share'] / summary['uniform_share']:.1f}x",
            f"{r['normalized_entropy']:.3f}", str(r["modal_dominant_position"]), f"{r['modal_position_fraction']:.0%}",
            f"{r['mean_sinks_per_sample']:.2f}", kinds,
        )
    return table

