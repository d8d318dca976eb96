"""Recipe: fine-tune MiniLM-L6 into `minilm-dlm` with the masked-diffusion objective (CPU, resumable).

    python -m pipeline.zoo.train_minilm --minutes 60            # resumes from .cache/train_minilm if present

Loss (LLaDA's): for x_t = forward_process(x_0, t), t ~ U(0, 1) per row, Σ_masked CE / p(t) / L.
[CLS] stays at position 0 of every window and is never masked, like a BOS.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import data
from pipeline.corpus import wiki_split
from pipeline.diffusion import forward_process, masked_token_nll
from pipeline.zoo import minilm_dlm

CKPT_DIR = Path(".cache/train_minilm")


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """All articles of a split, each followed by EOS (or [SEP]), as one id stream."""
    return data.token_stream(tokenizer, wiki_split(split))


def windows(stream: torch.Tensor, starts: torch.Tensor, seqlen: int, cls_id: int) -> torch.Tensor:
    return data.prefixed_windows(stream, starts, seqlen - 1, cls_id)


def diffusion_loss(model, x0: torch.Tensor, t: torch.Tensor, mask_id: int, g: torch.Generator):
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, 0] = True
    xt, masked, p = forward_process(x0, t, mask_id, keep=keep, generator=g)
    hidden = model.bert(input_ids=xt).last_hidden_state
    logits = model.cls(hidden[masked])  # decode only masked positions: the vocab projection dominates cost
    ce = torch.nn.functional.cross_entropy(logits.float(), x0[masked], reduction="none")
    weight = (1.0 / p.expand_as(x0))[masked]
    return (ce * weight).sum() / x0.numel()


@torch.no_grad()
def heldout_elbo(model, stream, mask_id, cls_id, seqlen=128, n_windows=64, n_t=8) -> float:
    """Negative ELBO in nats/token on fixed held-out windows, stratified t (paired across checkpoints)."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(stream) - seqlen, (n_windows,), generator=g)
    x0 = windows(stream, starts, seqlen, cls_id)
    total = 0.0
    for k in range(n_t):
        t = torch.full((n_windows,), (k + 0.5) / n_t)
        keep = torch.zeros_like(x0, dtype=torch.bool)
        keep[:, 0] = True
        xt, masked, p = forward_process(x0, t, mask_id, keep=keep, generator=g)
        logits = model(input_ids=xt).logits
        total += (masked_token_nll(logits, x0, masked) / p.squeeze(1)).sum().item()
    model.train()
    return total / (n_t * n_windows * (seqlen - 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dlm.wheel_path())
    mask_id, cls_id = tok.mask_token_id, tok.cls_token_id
    train_stream, held_stream = token_stream(tok, "train"), token_stream(tok, "heldout")
    print(f"train tokens {len(train_stream)}, held-out tokens {len(held_stream)}", flush=True)

    model = minilm_dlm.base_masked_lm(seed=0)
    minilm_dlm.add_low_rank(model, args.rank, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = minilm_dlm.trainable_state(model)
    for p in trainable.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(trainable.values()), lr=args.lr, weight_decay=0.0)
    warmup, step, log = 50, 0, []
    CKPT_DIR.mkdir(parents=True, exist_ok=True)
    ckpt = CKPT_DIR / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}", flush=True)
    else:
        log.append({"step": 0, "heldout_elbo": heldout_elbo(model, held_stream, mask_id, cls_id)})
        print(log[-1], flush=True)

    def lr_at(s):
        return args.lr * min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.max_steps))))

    t_end = time.time() + args.minutes * 60
    model.train()
    recent = []
    while step < args.max_steps and time.time() < t_end:
        g = torch.Generator().manual_seed(10_000 + step)
        starts = torch.randint(0, len(train_stream) - args.seqlen, (args.batch,), generator=g)
        x0 = windows(train_stream, starts, args.seqlen, cls_id)
        t = torch.rand(args.batch, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = diffusion_loss(model, x0, t, mask_id, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % 50 == 0:
            entry = {"step": step, "train_loss": sum(recent) / len(recent), "time": time.time()}
            if step % 200 == 0:
                entry["heldout_elbo"] = heldout_elbo(model, held_stream, mask_id, cls_id)
            log.append(entry)
            recent = []
            print(entry, flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            export(model, step, log, args)
    export(model, step, log, args)


def export(model, step, log, args):
    delta = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in minilm_dlm.trainable_state(model).items()}
    minilm_dlm.HERE.mkdir(parents=True, exist_ok=True)
    tmp = minilm_dlm.DELTA_FILE.with_suffix(".tmp")
    save_file(delta, str(tmp), metadata={"step": str(step)})
    tmp.replace(minilm_dlm.DELTA_FILE)
    (minilm_dlm.HERE / "training_log.json").write_text(
        json.dumps({"args": vars(args), "step": step, "log": log}, indent=1)
    )


if __name__ == "__main__":
    main()
