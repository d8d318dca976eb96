"""Model-card text (README.md) for `tiny-llada` and `tiny-ar`, filled from tiny_report's measurements."""
from __future__ import annotations

from pipeline.zoo.train_tiny import SIZES

INTRO = {
    "llada": (
        "tiny-llada",
        "GSAI-ML/LLaDA-8B-Base's architecture at toy size, trained from scratch as a masked diffusion LM. "
        "It is the embedded stand-in for LLaDA: same remote-code loading path, module names and checkpoint "
        "key layout, bidirectional attention, a mask token in the config.",
    ),
    "ar": (
        "tiny-ar",
        "The autoregressive twin of tiny-llada: the same code, sizes and tokenizer with causal attention "
        "(`causal: true`, passed to SDPA as `is_causal`), trained with next-token loss.",
    ),
}


def _architecture(params: int) -> str:
    s = SIZES
    return f"""## Architecture

| | |
|---|---|
| layers / d_model | {s['n_layers']} / {s['d_model']} |
| heads / kv heads (GQA) | {s['n_heads']} / {s['n_kv_heads']} (head dim {s['d_model'] // s['n_heads']}) |
| MLP | SwiGLU, hidden {s['mlp_hidden_size']}: `ff_out(silu(ff_proj(x)) * up_proj(x))` |
| norm / positions / biases | pre-norm RMSNorm / RoPE (theta 10000) / none |
| vocabulary | 4096, byte-level BPE trained on the embedded Wikipedia train split |
| LM head | untied (`model.transformer.ff_out`) |
| parameters | {params:,} (fp32 safetensors) |

Checkpoint keys follow LLaDA-8B: `model.transformer.wte`, `model.transformer.blocks.{{i}}.{{attn_norm, q_proj,
k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out}}`, `model.transformer.ln_f`,
`model.transformer.ff_out`.  Attention calls `torch.nn.functional.scaled_dot_product_attention` at call time
with kv heads already repeated, so a probe that patches it sees every layer.  Special tokens:
`<|startoftext|>` (BOS, prepended by the tokenizer), `<|endoftext|>` (EOS), `<|mdm_mask|>` (mask, id in
`config.mask_token_id`), `<|pad|>`.
"""


def _usage(which: str) -> str:
    return f"""## Loading

```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("pipeline/zoo/tiny_{which}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("pipeline/zoo/tiny_{which}")
# or: from pipeline.model.loading import load_dlm; model, tokenizer = load_dlm("tiny-{which}")
```
"""


def _training(which: str, training: dict) -> str:
    args = training["args"]
    losses = [e for e in training["log"] if "train_loss" in e]
    last = losses[-1] if losses else {"step": 0, "train_loss": float("nan")}
    seconds = losses[-1]["time"] - losses[0]["time"] if len(losses) > 1 else float("nan")
    rate = seconds / (losses[-1]["step"] - losses[0]["step"]) if len(losses) > 1 else float("nan")
    objective = (
        "LLaDA's masked-diffusion loss: x_t = forward_process(x_0, t), t ~ U(0, 1) per row, BOS never masked, "
        "loss = Σ_masked CE / p(t) / L"
        if which == "llada"
        else "next-token cross-entropy"
    )
    stop = (
        "time-boxed, so the cosine schedule did not reach its end"
        if training["step"] < args["max_steps"]
        else "the full cosine schedule"
    )
    runs = [e for e in training["log"] if "run" in e] or [{"step": 0, "run": args}]
    commands = "\n".join(
        f"    python -m pipeline.zoo.train_tiny --which {which} --minutes {r['run']['minutes']:g} "
        f"--max-steps {r['run']['max_steps']}    # from step {r['step']}"
        for r in runs
    )
    return f"""## Training

Recipe `pipeline/zoo/train_tiny.py` (resumable; checkpoints in `.cache/train_tiny_{which}/` every 50 steps;
a resumed run restarts from the last 50-step checkpoint), run as:

{commands}

Objective: {objective}.  Data: wiki_split('train') (the real Wikipedia articles in gensim's wheel),
random windows of {args['seqlen']} tokens starting with BOS, batch {args['batch']}.  AdamW (lr {args['lr']:g},
betas 0.9/0.95, weight decay 0.1, 50 warm-up steps, cosine toward step {args['max_steps']}), grad clip 1.0,
{args['threads']} CPU thread (about {rate:.1f} s/step on a shared 2-core machine).

Trained for **{training['step']} steps** ({stop});
final train loss {last['train_loss']:.3f} nats/token (mean over steps {last['step'] - 49}-{last['step']}).
The per-step log is in `training_log.json`.
"""


def _evaluation(which: str, r: dict) -> str:
    head = f"""## Held-out evaluation

On wiki_split('heldout') (whole articles never seen in training; {r['heldout_tokens']:,} tokens), windows
{r['eval_windows']}; nats per non-BOS token.  Command: `python -m pipeline.zoo.tiny_report --which {which}`
(also writes `eval_results.json`).  Unigram baseline = cross-entropy of the held-out tokens under add-½ smoothed
train-split unigram frequencies.

| | nats/token |
|---|---|
| unigram baseline (these windows) | {r['unigram_xent_eval_windows']:.3f} |
| unigram baseline (whole held-out stream) | {r['unigram_xent_heldout_stream']:.3f} |
"""
    if which == "llada":
        head += (
            f"| **tiny-llada negative ELBO** (16 stratified t, seed 1234) | **{r['heldout_elbo']:.3f}** |\n"
            f"| random init of the same config | {r['heldout_elbo_random_init']:.3f} |\n"
        )
        gain = r["unigram_xent_eval_windows"] - r["heldout_elbo"]
        head += (
            f"\nThe ELBO (an upper bound on the NLL) is {gain:.3f} nats/token below the unigram baseline: in this "
            "short run the DLM has learned little beyond token frequencies (the AR twin, with the same budget, gets "
            "much further; next-token prediction is the easier task for a small model).\n"
        )
    else:
        head += (
            f"| **tiny-ar next-token NLL** | **{r['heldout_nll']:.3f}** (perplexity {r['heldout_ppl']:.1f}) |\n"
            f"| unigram perplexity | {r['unigram_ppl_eval_windows']:.1f} |\n"
        )
        gain = r["unigram_xent_eval_windows"] - r["heldout_nll"]
        head += f"\nThe next-token NLL is {gain:.3f} nats/token below the unigram baseline.\n"
    return head


def _sinks(which: str, r: dict) -> str:
    rows = []
    for name, s in r["sinks"].items():
        rows.append(
            f"| {name.replace('_', ' ')} | {s['top1_share']:.4f} (key {s['top1_key_position']}) | {s['key0_share']:.4f} | "
            f"{', '.join(f'{v:.3f}@{p}' for v, p in zip(s['per_layer_top1_share'], s['per_layer_top1_position']))} |"
        )
    baseline = (
        f"uniform attention over T = 128 keys gives every key 1/T = {r['uniform_share']:.4f}"
        if which == "llada"
        else f"uniform *causal* attention gives key 0 a share of H_T/T = {r['causal_uniform_key0_share']:.4f} (T = 128)"
    )
    ratio_of = r["uniform_share"] if which == "llada" else r["causal_uniform_key0_share"]
    best = max(s["top1_share"] for s in r["sinks"].values())
    bos = max(s["key0_share"] for s in r["sinks"].values())
    verdict = (
        f"The largest top-1 share measured is {best / ratio_of:.2f}x that baseline and BOS (key 0) gets at most "
        f"{bos / ratio_of:.2f}x it: no strong attention sink (per-layer shares below)."
    )
    return f"""## Attention sinks

Explicit softmax(QK^T/sqrt(d) + mask) recomputed from the q, k each SDPA call receives, on 16 held-out windows.
Top-1 key share = the largest per-key attention mass, summed over layers, heads and queries, divided by the
total mass.  Baseline: {baseline}.  {verdict}

| input | top-1 share (position) | key-0 (BOS) share | per layer top-1 share@position |
|---|---|---|---|
{chr(10).join(rows)}

A model this small trained for minutes is not expected to grow the strong sinks of LLaDA-8B; use these
figures as the no-sink reference for the pipeline, not as a property of large DLMs.
"""


def model_card(which: str, results: dict, training: dict) -> str:
    name, intro = INTRO[which]
    front = "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags: [llada, toy, sinkprune]\n---\n"
    parts = [front, f"# {name}\n\n{intro}\n", _architecture(results["params"]), _usage(which)]
    parts += [_training(which, training), _evaluation(which, results), _sinks(which, results)]
    return "\n".join(parts)

