"""Recipe: fine-tune MiniLM-L6 into the zoo's MiniLM models (CPU, resumable).

    python -m pipeline.zoo.train_minilm --minutes 60                           # minilm-dlm
    python -m pipeline.zoo.train_minilm --variant minilm-dlm-rel --init-from minilm-dlm
    python -m pipeline.zoo.train_minilm --variant minilm-ar

Each resumes from .cache/train_<variant> if present.
- minilm-dlm (LLaDA's loss): x_t = forward_process(x_0, t), t ~ U(0, 1) per row, Σ_masked CE / p(t) / L;
  [CLS] stays at position 0 of every window and is never masked, like a BOS.
- minilm-dlm-rel: the same loss with every position maskable ([CLS] too, the reference's forward
  process), BERT's position-0 row removed from the table and a random position offset per window
  (0 … 512 − seqlen), so no absolute position can anchor a sink.
- minilm-ar: next-token cross-entropy with causal attention (BertLMHeadModel); keeps its position-0 sink.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.maths.diffusion import forward_process, masked_token_nll
from pipeline.model import minilm
from pipeline.zoo.training import next_token_loss, parse_loop_arguments, token_stream, train, windows



def keep_mask(x0: torch.Tensor, variant) -> torch.Tensor | None:
    """minilm-dlm never masks [CLS] at index 0; minilm-dlm-rel masks every position."""
    if variant.drop_first_position:
        return None
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, 0] = True
    return keep


def random_positions(x0: torch.Tensor, variant, g: torch.Generator, max_positions: int = 512) -> torch.Tensor | None:
    if not variant.drop_first_position:
        return None
    offsets = torch.randint(0, max_positions - x0.shape[1] + 1, (x0.shape[0], 1), generator=g)
    return offsets + torch.arange(x0.shape[1])


def diffusion_loss(model, x0: torch.Tensor, t: torch.Tensor, mask_id: int, g: torch.Generator, variant):
    xt, masked, p = forward_process(x0, t, mask_id, keep=keep_mask(x0, variant), generator=g)
    hidden = model.bert(input_ids=xt, position_ids=random_positions(x0, variant, g)).last_hidden_state
    logits = model.cls(hidden[masked])  # decode only masked positions: the vocab projection dominates cost
    ce = torch.nn.functional.cross_entropy(logits.float(), x0[masked], reduction="none")
    weight = (1.0 / p.expand_as(x0))[masked]
    return (ce * weight).sum() / x0.numel()


@torch.no_grad()
def heldout_elbo(model, stream, mask_id, cls_id, variant, seqlen=128, n_windows=64, n_t=8) -> float:
    """Negative ELBO (next-token NLL for the AR twin) in nats/token on fixed held-out windows, stratified t.

    Positions start at 0, as everywhere else in the toolkit (paired across checkpoints)."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(stream) - seqlen, (n_windows,), generator=g)
    x0 = windows(stream, starts, seqlen, cls_id)
    if variant.causal:
        nll = next_token_loss(model, x0).item()
        model.train()
        return nll
    total = 0.0
    for k in range(n_t):
        t = torch.full((n_windows,), (k + 0.5) / n_t)
        xt, masked, p = forward_process(x0, t, mask_id, keep=keep_mask(x0, variant), generator=g)
        logits = model(input_ids=xt).logits
        total += (masked_token_nll(logits, x0, masked) / p.squeeze(1)).sum().item()
    model.train()
    return total / (n_t * n_windows * (seqlen - 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--variant", choices=sorted(minilm.VARIANTS), default="minilm-dlm")
    ap.add_argument("--init-from", choices=sorted(minilm.VARIANTS), default=None,
                    help="start from another variant's delta (e.g. minilm-dlm-rel from minilm-dlm)")
    args = parse_loop_arguments(ap, minutes=60.0, max_steps=4000, batch=16, lr=1e-3, threads=2)
    variant = minilm.VARIANTS[args.variant]
    ckpt_dir = Path(".cache") / f"train_{variant.folder}"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm.wheel_path())
    mask_id, cls_id = tok.mask_token_id, tok.cls_token_id
    train_stream, held_stream = token_stream(tok, "train"), token_stream(tok, "heldout")
    print(f"train tokens {len(train_stream)}, held-out tokens {len(held_stream)}", flush=True)

    model = minilm.base_masked_lm(seed=0, drop_first_position=variant.drop_first_position, causal=variant.causal)
    minilm.add_low_rank(model, args.rank, seed=0)
    if args.init_from:
        from safetensors.torch import load_file

        init = {k: v.float() for k, v in load_file(str(minilm.VARIANTS[args.init_from].delta_file)).items()}
        missing = set(init) - set(minilm.trainable_state(model))
        assert not missing, missing
        model.load_state_dict(init, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(minilm.trainable_state(model).values())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def loss_fn(x0, g):
        t = torch.rand(args.batch, generator=g)
        return next_token_loss(model, x0) if variant.causal else diffusion_loss(model, x0, t, mask_id, g, variant)

    train(model, opt, trainable, stream=train_stream, first_id=cls_id, loss_fn=loss_fn,
          evaluate=lambda: {"heldout_elbo": heldout_elbo(model, held_stream, mask_id, cls_id, variant)},
          export=lambda step, log: export(model, step, log, args, variant), ckpt_dir=ckpt_dir, args=args)


def export(model, step, log, args, variant):
    delta = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in minilm.trainable_state(model).items()}
    variant.here.mkdir(parents=True, exist_ok=True)
    tmp = variant.delta_file.with_suffix(".tmp")
    save_file(delta, str(tmp), metadata={"step": str(step)})
    tmp.replace(variant.delta_file)
    (variant.here / "training_log.json").write_text(
        json.dumps({"args": vars(args), "step": step, "log": log}, indent=1)
    )


if __name__ == "__main__":
    main()
