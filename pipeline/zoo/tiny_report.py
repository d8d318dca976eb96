"""Measure the trained twins on wiki_split('heldout') and write their model cards (README.md).

    python -m pipeline.zoo.tiny_report --which llada      # or --which ar

Figures, all in nats/token over the L-1 non-BOS tokens of fixed held-out windows (seed 1234):
  * unigram baseline: cross-entropy of the held-out tokens under add-½ smoothed train-split unigram frequencies;
  * tiny-llada: masked-diffusion negative ELBO (stratified t, fixed seed), also for a random init of the config;
  * tiny-ar: next-token NLL and perplexity.
Sink concentration: explicit softmax(QK^T/sqrt(d) + mask) recomputed from the q, k every SDPA call receives
(a debug hook installed here only; pipeline/maths/attention.py is the real probe).  The top-1 key share is the
largest per-key attention mass, summed over layers, heads and queries, divided by the total mass; it is
compared with uniform attention: 1/T for bidirectional attention, and H_T/T for key 0 under causal attention.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch

from pipeline.maths.diffusion import forward_process
from pipeline.zoo import train_tiny, training
from pipeline.zoo.tiny_card import model_card

SEQLEN, N_WINDOWS, SEED = 128, 128, 1234
SINK_MASK_RATES = (0.1, 0.5, 0.9)


def unigram_cross_entropy(train_stream: torch.Tensor, tokens: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train_stream, minlength=vocab).double() + 0.5
    log_p = counts.log() - counts.sum().log()
    return -log_p[tokens].mean().item()


def eval_windows(stream: torch.Tensor, bos_id: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    starts = torch.randint(0, len(stream) - SEQLEN, (N_WINDOWS,), generator=g)
    return training.windows(stream, starts, SEQLEN, bos_id)


@contextlib.contextmanager
def key_mass_recorder(per_layer: list):
    """Patch SDPA so each call also adds its explicit attention's per-key mass [T] to per_layer."""
    original = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        length = q.shape[-2]
        scores = (q.float() @ k.float().transpose(-2, -1)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            causal = torch.ones(length, k.shape[-2], dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = scores.softmax(dim=-1)
        per_layer.append(probs.sum(dim=(0, 1, 2)).double())  # mass on each key: batch, heads, queries
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = recording_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@torch.no_grad()
def sink_shares(model, input_ids: torch.Tensor) -> dict:
    per_layer: list[torch.Tensor] = []
    with key_mass_recorder(per_layer):
        model(input_ids=input_ids)
    total_per_key = torch.stack(per_layer).sum(0)
    top_key = int(total_per_key.argmax())
    layer_shares = [float(m.max() / m.sum()) for m in per_layer]
    return {
        "top1_key_position": top_key,
        "top1_share": float(total_per_key[top_key] / total_per_key.sum()),
        "key0_share": float(total_per_key[0] / total_per_key.sum()),
        "per_layer_top1_share": [round(s, 4) for s in layer_shares],
        "per_layer_top1_position": [int(m.argmax()) for m in per_layer],
    }


def measure(which: str) -> dict:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    folder = train_tiny.out_dir(which)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    config = model.config
    train_stream = training.token_stream(tok, "train")
    held_stream = training.token_stream(tok, "heldout")
    x0 = eval_windows(held_stream, config.bos_token_id)
    results = {
        "heldout_tokens": len(held_stream),
        "eval_windows": f"{N_WINDOWS} x {SEQLEN} (BOS + {SEQLEN - 1} tokens), seed {SEED}",
        "unigram_xent_eval_windows": unigram_cross_entropy(train_stream, x0[:, 1:].reshape(-1), config.vocab_size),
        "unigram_xent_heldout_stream": unigram_cross_entropy(train_stream, held_stream, config.vocab_size),
        "params": sum(p.numel() for p in model.parameters()),
    }
    sample = x0[:16]  # the sink probe's batch
    if which == "llada":
        elbo = lambda m: train_tiny.heldout_elbo(  # noqa: E731
            m, held_stream, config.mask_token_id, config.bos_token_id, SEQLEN, N_WINDOWS, n_t=16, seed=SEED
        )
        results["heldout_elbo"] = elbo(model)
        results["heldout_elbo_random_init"] = elbo(train_tiny.new_model(config).eval())
        results["sinks"] = {}
        g = torch.Generator().manual_seed(SEED)
        for rate in SINK_MASK_RATES:
            keep = train_tiny.bos_keep(sample)
            xt, _, _ = forward_process(sample, rate, config.mask_token_id, keep=keep, eps=0.0, generator=g)
            results["sinks"][f"mask_rate_{rate}"] = sink_shares(model, xt)
        results["uniform_share"] = 1.0 / SEQLEN
    else:
        nll = train_tiny.heldout_next_token_nll(model, held_stream, config.bos_token_id, SEQLEN, N_WINDOWS, seed=SEED)
        results["heldout_nll"] = nll
        results["heldout_ppl"] = math.exp(nll)
        results["unigram_ppl_eval_windows"] = math.exp(results["unigram_xent_eval_windows"])
        results["sinks"] = {"clean_text": sink_shares(model, sample)}
        harmonic = sum(1.0 / (i + 1) for i in range(SEQLEN))
        results["causal_uniform_key0_share"] = harmonic / SEQLEN
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=("llada", "ar"), required=True)
    ap.add_argument("--card-only", action="store_true", help="rewrite README.md from eval_results.json")
    args = ap.parse_args()
    folder = train_tiny.out_dir(args.which)
    if args.card_only:
        results = json.loads((folder / "eval_results.json").read_text())
    else:
        results = measure(args.which)
        (folder / "eval_results.json").write_text(json.dumps(results, indent=1))
    training = json.loads((folder / "training_log.json").read_text())
    (folder / "README.md").write_text(model_card(args.which, results, training))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
