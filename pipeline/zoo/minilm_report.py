"""Measure a MiniLM zoo model for its card: held-out NLL vs the unigram baseline, and sink shares.

    python -m pipeline.zoo.minilm_report                            # pipeline/zoo/minilm_dlm/eval_results.json
    python -m pipeline.zoo.minilm_report --variant minilm-dlm-rel   # … minilm_dlm_rel/eval_results.json
    python -m pipeline.zoo.minilm_report --variant minilm-ar        # … minilm_ar/eval_results.json

The NLL is the masked-diffusion negative ELBO for the DLMs and the next-token NLL for minilm-ar.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from pipeline.maths.attention import AttentionMassProbe
from pipeline.maths.diffusion import forward_process
from pipeline.model.loading import load_dlm
from pipeline.maths.sinks import mass_statistics
from pipeline.model import minilm
from pipeline.zoo.train_minilm import heldout_elbo
from pipeline.zoo.training import token_stream, windows


def unigram_entropy(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 0.5  # add-half smoothing: unseen held-out tokens
    return -(counts / counts.sum()).log()[held].mean().item()


@torch.no_grad()
def sink_shares(model, stream, mask_id, cls_id, rates=(0.0, 0.5, 0.9), n=16, seqlen=128, keep_cls=True) -> dict:
    g = torch.Generator().manual_seed(7)
    x0 = windows(stream, torch.randint(0, len(stream) - seqlen, (n,), generator=g), seqlen, cls_id)
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, 0] = keep_cls
    out = {}
    for rate in rates:
        xt, _, _ = forward_process(x0, rate, mask_id, eps=0.0, keep=keep, generator=g)
        with AttentionMassProbe() as probe:
            model(input_ids=xt)
        stats = mass_statistics(probe.mass)
        out[f"mask_rate_{rate}"] = {
            "top1_share": stats["top1_share"].mean().item(),
            "cls_share": (probe.mass[:, 0] / probe.mass.sum(dim=1)).mean().item(),
            "dominant_is_cls": (stats["dominant_position"] == 0).float().mean().item(),
            "uniform_share": 1.0 / seqlen,
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.zoo.minilm_report")
    ap.add_argument("--variant", choices=sorted(minilm.VARIANTS), default="minilm-dlm")
    args = ap.parse_args(argv)
    variant = minilm.VARIANTS[args.variant]
    torch.set_num_threads(2)
    model, tok = load_dlm(variant.name)
    train, held = token_stream(tok, "train"), token_stream(tok, "heldout")
    log = json.loads((variant.here / "training_log.json").read_text())
    results = {
        "steps": log["step"],
        "objective": "next-token NLL" if variant.causal else "masked-diffusion negative ELBO",
        "heldout_neg_elbo_nats_per_token": heldout_elbo(model, held, tok.mask_token_id, tok.cls_token_id, variant),
        "unigram_entropy_nats_per_token": unigram_entropy(train, held, tok.vocab_size),
        "uniform_nats_per_token": math.log(tok.vocab_size),
        "sinks": sink_shares(model, held, tok.mask_token_id, tok.cls_token_id, rates=(0.0,) if variant.causal else (0.0, 0.5, 0.9),
                             keep_cls=not variant.drop_first_position),
        "delta_digest": minilm._delta_digest(variant),
    }
    (variant.here / "eval_results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
