"""The zoo's training loop, shared by `train_tiny` and `train_minilm`: CPU, resumable, logged, exported.

    train(model, opt, params, stream=..., first_id=..., loss_fn=..., evaluate=..., export=..., ckpt_dir=..., args=...)

Batches are random `args.seqlen` windows of the training stream, each led by `first_id` (BOS / [CLS]),
drawn from a generator seeded by the step (a resumed run draws the same batches). Every 50 steps: the
mean training loss, a checkpoint (`ckpt_dir/last.pt`, model + optimizer, written then renamed) and an
export; every 200 steps also `evaluate()`. Learning rate: linear warm-up, then cosine to 10% of `args.lr`
at `args.max_steps`. Stops at `args.max_steps` or after `args.minutes`.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.model import data
from pipeline.model.corpus import wiki_split


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """All articles of a split, each followed by EOS (or [SEP]), as one id stream."""
    return data.token_stream(tokenizer, wiki_split(split))


def windows(stream: torch.Tensor, starts: torch.Tensor, seqlen: int, first_id: int) -> torch.Tensor:
    return data.prefixed_windows(stream, starts, seqlen - 1, first_id)


def next_token_loss(model, x0: torch.Tensor) -> torch.Tensor:
    """Causal LM cross-entropy: position i predicts token i + 1."""
    logits = model(input_ids=x0).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x0[:, 1:].reshape(-1))


def lr_at(step: int, lr: float, max_steps: int, warmup: int = 50) -> float:
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max_steps)))
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)


def _resume(model, opt, ckpt: Path, evaluate: Callable[[], dict]) -> tuple[int, list]:
    if ckpt.exists():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        print(f"resumed at step {state['step']}", flush=True)
        return state["step"], state["log"]
    log = [{"step": 0, **evaluate()}]
    print(log[-1], flush=True)
    return 0, log


def parse_loop_arguments(ap: argparse.ArgumentParser, *, minutes: float, max_steps: int, batch: int, lr: float,
                         threads: int, seqlen: int = 128) -> argparse.Namespace:
    """Add the options `train` reads (--minutes, --max-steps, --batch, --seqlen, --lr) and --threads, with the recipe's
    defaults, to `ap`; parse the command line and set torch's thread count."""
    ap.add_argument("--minutes", type=float, default=minutes)
    ap.add_argument("--max-steps", type=int, default=max_steps)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seqlen", type=int, default=seqlen)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--threads", type=int, default=threads)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def train(model, opt, params, *, stream: torch.Tensor, first_id: int,
          loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], evaluate: Callable[[], dict],
          export: Callable[[int, list], None], ckpt_dir: Path, args) -> None:
    """loss_fn(x0 [B, T], generator) -> scalar loss; evaluate() -> dict of held-out figures;
    export(step, log) writes the model where its loader finds it. args: lr, max_steps, minutes, batch, seqlen."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "last.pt"
    step, log = _resume(model, opt, ckpt, evaluate)
    log.append({"step": step, "run": {"minutes": args.minutes, "max_steps": args.max_steps}})  # each invocation
    t_end = time.time() + args.minutes * 60
    model.train()
    recent = []
    while step < args.max_steps and time.time() < t_end:
        g = torch.Generator().manual_seed(10_000 + step)
        starts = torch.randint(0, len(stream) - args.seqlen, (args.batch,), generator=g)
        x0 = windows(stream, starts, args.seqlen, first_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.max_steps)
        loss = loss_fn(x0, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        recent.append(loss.item())
        if step % 50 == 0:
            entry = {"step": step, "train_loss": sum(recent) / len(recent), "time": time.time()}
            if step % 200 == 0:
                entry.update(evaluate())
            log.append(entry)
            recent = []
            print(entry, flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "log": log}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            export(step, log)
    if log[-1]["step"] != step or "run" in log[-1]:
        log.append({"step": step, **evaluate()})
    export(step, log)
