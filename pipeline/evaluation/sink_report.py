"""`python -m pipeline.evaluation.sink_report`: do attention sinks move along a DLM's denoising but stay put in an AR model?

DLM (default mode "denoise"): each held-out window keeps its first quarter as the prompt; the rest starts
fully masked and is filled by low-confidence iterative denoising (greedy, one block, at each step the most
confident masked predictions are committed). The attention mass of every query is measured at every step.
Mode "forward" instead measures the forward-process timesteps t = 1.0, 0.9, …, 0.1 on the whole window.
AR: greedy generation from the same prompt; at each step the mass of the newest query only (the one that
predicts the next token), so position 0 as a sink is compared with 1/n and with H_n/n.

Writes <out>/sinks.json and heatmaps (mean share of mass per step) for each model; prints a rich table.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

from pipeline.maths.attention import AttentionMassProbe
from pipeline.evaluation.sink_tables import plot_heatmap
from pipeline.maths.sinks import causal_baseline_share, mass_statistics, sink_position_variance, sink_scores, token_kind
from pipeline.run.outputs import AtomicDir, prepare_output_dir


# --- inputs ---------------------------------------------------------------------------------------------
def heldout_windows(tokenizer, samples: int, length: int) -> torch.Tensor:
    """[samples, length] token ids (no special tokens): consecutive non-overlapping windows of the held-out
    articles, taken round-robin (1st window of every article, then 2nd, …) so that samples spread over
    articles (the held-out split has only a handful of long articles)."""
    from pipeline.model.corpus import wiki_split

    per_article = []
    for text in wiki_split("heldout"):
        ids = tokenizer(text[: length * 12 * samples], add_special_tokens=False, verbose=False)["input_ids"]  # no max-length warning: never fed whole
        per_article.append([ids[i: i + length] for i in range(0, len(ids) - length + 1, length)])
    rows = []
    for j in range(max((len(w) for w in per_article), default=0)):
        rows += [windows[j] for windows in per_article if j < len(windows)]
    if len(rows) < samples:
        raise ValueError(f"the held-out split has only {len(rows)} windows of {length} tokens; lower --samples or --seqlen")
    return torch.tensor(rows[:samples])


def _prefix_id(tokenizer) -> list[int]:
    for attr in ("cls_token_id", "bos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return [int(getattr(tokenizer, attr))]
    return []


def _suffix_id(tokenizer) -> list[int]:
    # BERT-style encoders were trained with [CLS] … [SEP]; causal and LLaDA-style models only get a BOS
    return [int(tokenizer.sep_token_id)] if getattr(tokenizer, "cls_token_id", None) is not None and tokenizer.sep_token_id is not None else []


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(input_ids=ids, use_cache=False)
    except TypeError:  # remote code without a use_cache argument
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _probed_logits(model, ids, query_weights=None):
    with AttentionMassProbe(query_weights=query_weights) as probe:
        logits = _logits(model, ids)
    probe.require_attention(model)
    return logits, probe.mass


# --- trajectories: one mass [B, T] per step, with the tokens the model saw ------------------------------
@torch.no_grad()
def dlm_denoising_trajectory(model, tokenizer, mask_id: int, windows: torch.Tensor, steps: int):
    batch, length = windows.shape
    prompt_len = max(1, length // 4)
    gen_len = length - prompt_len
    if not 1 <= steps <= gen_len:
        raise ValueError(f"--steps={steps} must be between 1 and the masked continuation length {gen_len}")
    prefix, suffix = _prefix_id(tokenizer), _suffix_id(tokenizer)
    x = torch.cat([
        torch.tensor(prefix, dtype=torch.long).expand(batch, -1), windows[:, :prompt_len],
        torch.full((batch, gen_len), mask_id), torch.tensor(suffix, dtype=torch.long).expand(batch, -1),
    ], dim=1)
    trajectory = []
    for step in range(steps):
        masked = x == mask_id
        logits, mass = _probed_logits(model, x)
        trajectory.append((f"step {step + 1}", mass, x.clone()))
        logits[..., mask_id] = -torch.inf  # a committed token is never the mask itself
        confidence, prediction = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        confidence = confidence.masked_fill(~masked, -1.0)
        remaining = int(masked[0].sum())
        commit = -(-remaining // (steps - step))  # spread what is left evenly over the steps left
        chosen = confidence.topk(commit, dim=1).indices
        x.scatter_(1, chosen, prediction.gather(1, chosen))
    return trajectory, {"prompt_tokens": prompt_len, "masked_continuation": gen_len, "length": x.shape[1]}


@torch.no_grad()
def dlm_forward_process_trajectory(model, tokenizer, mask_id: int, windows: torch.Tensor, steps: int, keep_special: bool = False):
    """Mass at forward-process timesteps t = 1.0 … 0.1.  Every position is maskable, [CLS]/[SEP] too (the
    reference's forward process and LLaDA's training); keep_special never masks them."""
    from pipeline.maths.diffusion import forward_process

    batch = windows.shape[0]
    prefix, suffix = _prefix_id(tokenizer), _suffix_id(tokenizer)
    x0 = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(batch, -1), windows,
                    torch.tensor(suffix, dtype=torch.long).expand(batch, -1)], dim=1)
    keep = torch.zeros_like(x0, dtype=torch.bool)
    if keep_special:
        keep[:, : len(prefix)] = True
        keep[:, x0.shape[1] - len(suffix):] = True
    generator = torch.Generator().manual_seed(0)
    trajectory = []
    for i in range(steps):
        t = round(1.0 - i * (0.9 / max(1, steps - 1)), 4) if steps > 1 else 1.0
        noisy, _, _ = forward_process(x0, t, mask_id, keep=keep, generator=generator)
        _, mass = _probed_logits(model, noisy)
        trajectory.append((f"t={t:.2f}", mass, noisy))
    return trajectory, {"length": x0.shape[1]}


@torch.no_grad()
def ar_generation_trajectory(model, tokenizer, windows: torch.Tensor, steps: int):
    batch, length = windows.shape
    prompt_len = max(1, length // 4)
    prefix = torch.tensor(_prefix_id(tokenizer), dtype=torch.long).expand(batch, -1)
    x = torch.cat([prefix, windows[:, :prompt_len]], dim=1)
    trajectory = []
    for step in range(steps):
        newest = torch.zeros(x.shape, dtype=torch.float32)
        newest[:, -1] = 1.0  # only the query that predicts the next token
        logits, mass = _probed_logits(model, x, query_weights=newest)
        trajectory.append((f"step {step + 1}", mass, x.clone()))
        x = torch.cat([x, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return trajectory, {"prompt_tokens": x.shape[1] - steps, "generated": steps}


# --- statistics -----------------------------------------------------------------------------------------
def summarize(trajectory, tokenizer, mask_id, causal: bool) -> dict:
    rows, kinds, content_kinds, heat = [], Counter(), Counter(), []
    dominant_by_sample = [[] for _ in range(trajectory[0][1].shape[0])]
    content_by_sample = [[] for _ in dominant_by_sample]
    # special tokens (CLS/BOS/SEP/EOS/PAD, not the mask) are where fixed sinks live; the content-token
    # sink is tracked separately to see whether anything moves beneath a fixed special-token sink
    specials = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or []) - {mask_id}), dtype=torch.long)
    width = max(mass.shape[1] for _, mass, _ in trajectory)
    for label, mass, tokens in trajectory:
        stats = mass_statistics(mass)
        n = mass.shape[1]
        dominant = stats["dominant_position"].tolist()
        content = mass_statistics(mass, valid=~torch.isin(tokens, specials))["dominant_position"].tolist()
        for b, (d, c) in enumerate(zip(dominant, content)):
            dominant_by_sample[b].append(d)
            content_by_sample[b].append(c)
        step_kinds = Counter(token_kind(tokens[b, d], tokenizer, mask_id) for b, d in enumerate(dominant))
        kinds.update(step_kinds)
        content_kinds.update(token_kind(tokens[b, c], tokenizer, mask_id) for b, c in enumerate(content))
        share = (mass / mass.sum(dim=1, keepdim=True)).mean(dim=0)
        heat.append(share.tolist() + [float("nan")] * (width - n))
        top1 = float(stats["top1_share"].mean())
        modal, modal_count = Counter(dominant).most_common(1)[0]
        rows.append({
            "step": label, "length": n, "top1_share": top1, "uniform_share": 1.0 / n,
            "causal_baseline_share": causal_baseline_share(n) if causal else None,
            "normalized_entropy": float(stats["normalized_entropy"].mean()),
            "modal_dominant_position": modal, "modal_fraction": modal_count / len(dominant),
            "sinks_per_sample": float((sink_scores(mass) > 0.5).sum(dim=1).float().mean()),
            "dominant_kinds": dict(step_kinds.most_common()),
        })
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    summary = {
        "sink_position_variance": sink_position_variance(dominant_by_sample),
        "distinct_dominant_positions": sum(len(set(s)) for s in dominant_by_sample) / len(dominant_by_sample),
        "dominant_at_position_0": sum(s.count(0) for s in dominant_by_sample) / sum(len(s) for s in dominant_by_sample),
        "content_sink_position_variance": sink_position_variance(content_by_sample),
        "content_distinct_dominant_positions": sum(len(set(s)) for s in content_by_sample) / len(content_by_sample),
        "content_dominant_kinds": dict(content_kinds.most_common()),
        "top1_share": mean("top1_share"),
        "top1_over_uniform": sum(r["top1_share"] / r["uniform_share"] for r in rows) / len(rows),
        "normalized_entropy": mean("normalized_entropy"),
        "sinks_per_sample": mean("sinks_per_sample"),
        "dominant_kinds": dict(kinds.most_common()),
        "dominant_positions_by_sample": dominant_by_sample,
        "content_dominant_positions_by_sample": content_by_sample,
        "steps": rows,
    }
    if causal:
        # a "sink" that sits on the newest tokens is local attention following the generation front
        summary["dominant_within_2_of_newest"] = sum(
            d >= r["length"] - 3 for seq in dominant_by_sample for d, r in zip(seq, rows)) / sum(map(len, dominant_by_sample))
        summary["top1_over_causal_baseline"] = sum(r["top1_share"] / r["causal_baseline_share"] for r in rows) / len(rows)
    return summary, heat


# --- models ---------------------------------------------------------------------------------------------
def checkpoint_identity(name: str) -> dict:
    """Where the weights came from, with a digest of local safetensors: zoo models are still being trained."""
    import hashlib

    from pipeline.model.loading import resolve_path

    path = Path(resolve_path(name))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return {"path": str(path), "safetensors_sha256_16": {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}}


def zoo_model_missing(name: str) -> str | None:
    """Why an embedded zoo model cannot be loaded yet (its folder is built by another recipe), else None."""
    from pipeline.model.loading import ZOO_DIR

    if name not in ("tiny-llada", "tiny-ar"):
        return None
    folder = ZOO_DIR / name.replace("-", "_")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return f"{name}: {folder} has no config.json + *.safetensors yet (the zoo model is not built); skipped"
    return None


def measure_dlm(name, args):
    from pipeline.model.loading import load_dlm, resolve_mask_token_id

    model, tokenizer = load_dlm(name)
    mask_id = resolve_mask_token_id(tokenizer, model.config)
    windows = heldout_windows(tokenizer, args.samples, args.seqlen)
    if args.dlm_mode == "denoise":
        trajectory, shape = dlm_denoising_trajectory(model, tokenizer, mask_id, windows, args.steps)
        mode = (f"low-confidence iterative denoising, {args.steps} steps, of a fully masked {shape['masked_continuation']}-token "
                f"continuation after a {shape['prompt_tokens']}-token held-out prompt; mass of all queries")
    else:
        trajectory, shape = dlm_forward_process_trajectory(model, tokenizer, mask_id, windows, args.steps, args.keep_special)
        masked = "special tokens never masked" if args.keep_special else "every position maskable"
        mode = f"forward-process timesteps t=1.0..0.1 ({args.steps} values) on held-out windows ({masked}); mass of all queries"
    summary, heat = summarize(trajectory, tokenizer, mask_id, causal=False)
    return {"model": name, "checkpoint": checkpoint_identity(name), "mode": mode, **shape, **summary}, heat, [label for label, _, _ in trajectory]


def measure_ar(name, args):
    from pipeline.model.loading import load_dlm

    model, tokenizer = load_dlm(name)
    windows = heldout_windows(tokenizer, args.samples, args.seqlen)
    trajectory, shape = ar_generation_trajectory(model, tokenizer, windows, args.steps)
    mode = f"greedy generation, {args.steps} new tokens after a {shape['prompt_tokens']}-token held-out prompt; mass of the newest query"
    summary, heat = summarize(trajectory, tokenizer, None, causal=True)
    return {"model": name, "checkpoint": checkpoint_identity(name), "mode": mode, **shape, **summary}, heat, [label for label, _, _ in trajectory]


# --- output ---------------------------------------------------------------------------------------------
def _fmt(value, spec=".3f"):
    return "n/a" if value is None else format(value, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the side-by-side comparison, shared by the rich and the Markdown table."""
    dlm, ar = report["dlm"], report.get("ar")
    header = ["metric", f"DLM {dlm['model']}", f"AR {ar['model']}" if ar else "AR (skipped)"]

    def both(label, key, spec, suffix=""):
        ar_value = "n/a" if ar is None or ar.get(key) is None else _fmt(ar[key], spec) + suffix
        return [label, _fmt(dlm.get(key), spec) + (suffix if dlm.get(key) is not None else ""), ar_value]

    def kinds(r, key):
        return "n/a" if r is None else ", ".join(f"{k} {v}" for k, v in list(r[key].items())[:3])

    rows = [
        both("dominant sink position variance", "sink_position_variance", ".2f"),
        both("distinct dominant positions / sample", "distinct_dominant_positions", ".2f"),
        both("steps with the sink at position 0", "dominant_at_position_0", ".0%"),
        both("steps with the sink on the 3 newest tokens (AR)", "dominant_within_2_of_newest", ".0%"),
        ["sink token kinds (sample-steps)", kinds(dlm, "dominant_kinds"), kinds(ar, "dominant_kinds")],
        both("content-token sink position variance (no CLS/BOS/SEP)", "content_sink_position_variance", ".2f"),
        both("distinct content sink positions / sample", "content_distinct_dominant_positions", ".2f"),
        ["content sink token kinds", kinds(dlm, "content_dominant_kinds"), kinds(ar, "content_dominant_kinds")],
        both("top-1 share of mass", "top1_share", ".3f"),
        both("top-1 share / uniform (1/n)", "top1_over_uniform", ".1f", "x"),
        both("top-1 share / causal H_n/n", "top1_over_causal_baseline", ".2f", "x"),
        both("normalised entropy", "normalized_entropy", ".3f"),
        both("sinks per sample (s > 0.5)", "sinks_per_sample", ".2f"),
        ["DLM / AR variance ratio", _fmt(report.get("variance_ratio"), ".2f"), ""],
    ]
    return header, rows


def render_table(report: dict):
    from rich.table import Table

    header, rows = table_rows(report)
    table = Table(title="attention sinks along the generation trajectory")
    for i, name in enumerate(header):  # values wrap between words, never inside one (no "0.…" at 80 columns)
        words = [w for row in rows for w in row[i].split()] if i else []
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold",
                         min_width=max([1, *map(len, words)]))
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(report: dict) -> str:
    """The same table in Markdown (written to <out>/table.md for docs)."""
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def variance_ratio(dlm: dict, ar: dict | None):
    if ar is None:
        return None
    if ar["sink_position_variance"] == 0:
        return float("inf") if dlm["sink_position_variance"] > 0 else float("nan")
    return dlm["sink_position_variance"] / ar["sink_position_variance"]


def write_output(out: Path, overwrite: bool, report: dict, heatmaps: dict) -> None:
    """Everything goes into an AtomicDir (with its MARKER), renamed into place only when complete."""
    with AtomicDir(out, overwrite=overwrite) as tmp:
        (tmp / "sinks.json").write_text(json.dumps(report, indent=1, allow_nan=True))
        (tmp / "table.md").write_text(markdown_table(report))
        for name, (matrix, labels, title) in heatmaps.items():
            plot_heatmap(torch.tensor(matrix), tmp / f"{name}.png", title=title, ylabels=labels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.evaluation.sink_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--dlm", default="minilm-dlm", help="diffusion LM: embedded name, folder or hub id")
    p.add_argument("--ar", default="tiny-ar", help="autoregressive model ('none' to skip)")
    p.add_argument("--samples", type=int, default=8, help="held-out windows (one batch)")
    p.add_argument("--seqlen", type=int, default=64, help="tokens per window (prompt = first quarter)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps / timesteps / AR tokens generated")
    p.add_argument("--dlm-mode", choices=("denoise", "forward"), default="denoise")
    p.add_argument("--keep-special", action="store_true", help="forward mode: never mask [CLS]/[SEP] (default: every position maskable)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist, or be empty, unless --overwrite and written by this tool)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from rich.console import Console

    from pipeline.run.console import quiet_libraries

    args = parse_args(argv)
    quiet_libraries(seed=None)  # transformers' "Some weights ... not used" (MiniLM's pooler) is no news to a user
    console = Console()  # 80 columns in a file: every table wraps its words, none cuts a value
    try:
        prepare_output_dir(args.out, args.overwrite, field="--out")
    except FileExistsError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dlm, dlm_heat, dlm_labels = measure_dlm(args.dlm, args)
    heatmaps = {"dlm_heatmap": (dlm_heat, dlm_labels, f"{args.dlm}: share of attention mass per step")}
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "dlm": dlm, "ar": None, "ar_skipped": None}
    missing = "AR model disabled (--ar none)" if args.ar.lower() == "none" else zoo_model_missing(args.ar)
    if missing:
        console.print(f"[yellow]{missing}[/yellow]", soft_wrap=True)
        report["ar_skipped"] = missing
    else:
        ar, ar_heat, ar_labels = measure_ar(args.ar, args)
        report["ar"] = ar
        heatmaps["ar_heatmap"] = (ar_heat, ar_labels, f"{args.ar}: newest query's share of attention mass per step")
    report["variance_ratio"] = variance_ratio(dlm, report["ar"])

    console.print(f"DLM mode: {dlm['mode']}")
    if report["ar"]:
        console.print(f"AR mode: {report['ar']['mode']}")
    console.print(render_table(report))
    write_output(args.out, args.overwrite, report, heatmaps)
    console.print(f"wrote {args.out}/sinks.json and heatmaps")
    return report


if __name__ == "__main__":
    main()
