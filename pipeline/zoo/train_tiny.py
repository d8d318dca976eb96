"""Recipe: train the structural twins `tiny-llada` (masked diffusion) and `tiny-ar` (next token) from scratch.

    python -m pipeline.zoo.train_tiny --which llada --minutes 20     # resumes from .cache/train_tiny_llada
    python -m pipeline.zoo.train_tiny --which ar --minutes 20        # resumes from .cache/train_tiny_ar

Both use LLaDA-8B's architecture at toy size (pipeline/zoo/tiny_llada/modeling_llada.py) and the shared BPE
tokenizer (pipeline/zoo/tiny_tokenizer.py) on wiki_split('train'); windows of 128 tokens start with BOS.
DLM loss (LLaDA's): x_t = forward_process(x_0, t), t ~ U(0, 1) per row, BOS never masked,
Σ_masked CE / p(t) / L.  AR loss: next-token cross-entropy.  `config.causal` is the only difference.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.maths.diffusion import forward_process, masked_token_nll
from pipeline.zoo.tiny_llada.configuration_llada import LLaDAConfig
from pipeline.zoo.tiny_llada.modeling_llada import LLaDAModelLM, scaled_init_
from pipeline.zoo.tiny_tokenizer import copy_tokenizer, ensure_tokenizer
from pipeline.zoo.training import next_token_loss, parse_loop_arguments, token_stream, train, windows

ZOO = Path(__file__).parent
CODE_DIR = ZOO / "tiny_llada"  # the remote-code files live here (twin_layers.py as a link) and are linked from tiny_ar
REMOTE_CODE = ("configuration_llada.py", "modeling_llada.py", "twin_layers.py")
SIZES = dict(d_model=192, n_heads=4, n_kv_heads=2, n_layers=4, mlp_hidden_size=512, max_sequence_length=512)


def out_dir(which: str) -> Path:
    return ZOO / f"tiny_{which}"


def make_config(which: str, tokenizer) -> LLaDAConfig:
    return LLaDAConfig.for_tokenizer(tokenizer, LLaDAModelLM, **SIZES, embedding_size=len(tokenizer),
                                     causal=(which == "ar"))


def new_model(config: LLaDAConfig, seed: int = 0) -> LLaDAModelLM:
    torch.manual_seed(seed)
    model = LLaDAModelLM(config)
    scaled_init_(model)
    return model


def bos_keep(x0: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros_like(x0, dtype=torch.bool)
    keep[:, 0] = True
    return keep


def diffusion_loss(model, x0, t, mask_id, g):
    xt, masked, p = forward_process(x0, t, mask_id, keep=bos_keep(x0), generator=g)
    body = model.model.transformer
    x = body.wte(xt)
    for block in body.blocks:
        x = block(x)
    x = body.ln_f(x)[masked]  # decode only masked positions: the vocab projection dominates the cost
    ce = F.cross_entropy(body.ff_out(x).float(), x0[masked], reduction="none")
    weight = (1.0 / p.expand_as(x0))[masked]
    return (ce * weight).sum() / x0.numel()


@torch.no_grad()
def heldout_elbo(model, stream, mask_id, bos_id, seqlen=128, n_windows=64, n_t=8, seed=1234) -> float:
    """Masked-diffusion negative ELBO, nats/token over the L-1 non-BOS tokens, stratified t, fixed seed."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen, (n_windows,), generator=g)
    x0 = windows(stream, starts, seqlen, bos_id)
    total = 0.0
    for k in range(n_t):
        t = torch.full((n_windows,), (k + 0.5) / n_t)
        xt, masked, p = forward_process(x0, t, mask_id, keep=bos_keep(x0), generator=g)
        logits = model(input_ids=xt).logits
        total += (masked_token_nll(logits, x0, masked) / p.squeeze(1)).sum().item()
    model.train(was_training)
    return total / (n_t * n_windows * (seqlen - 1))


@torch.no_grad()
def heldout_next_token_nll(model, stream, bos_id, seqlen=128, n_windows=64, seed=1234) -> float:
    """Next-token NLL in nats/token over the L-1 predicted tokens of the same fixed held-out windows."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen, (n_windows,), generator=g)
    x0 = windows(stream, starts, seqlen, bos_id)
    loss = next_token_loss(model, x0).item()
    model.train(was_training)
    return loss


def link_remote_code(folder: Path) -> None:
    """tiny_ar reads tiny_llada's remote code through relative symlinks (committed); make any that are missing."""
    for name in REMOTE_CODE:
        if not (folder / name).exists():
            (folder / name).symlink_to(os.path.relpath((CODE_DIR / name).resolve(), folder.resolve()))


def export(model, which: str, step: int, log: list, args) -> None:
    """Write config, weights (fp32 safetensors), remote code links and tokenizer into pipeline/zoo/tiny_<which>/."""
    folder = out_dir(which)
    model.save_pretrained(folder, safe_serialization=True)
    if folder != CODE_DIR:
        link_remote_code(folder)
        copy_tokenizer(CODE_DIR, folder)
    (folder / "training_log.json").write_text(json.dumps({"args": vars(args), "step": step, "log": log}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", choices=("llada", "ar"), required=True)
    args = parse_loop_arguments(ap, minutes=20.0, max_steps=1000, batch=32, lr=3e-3, threads=1)

    from transformers import AutoTokenizer

    ensure_tokenizer(CODE_DIR)
    tok = AutoTokenizer.from_pretrained(CODE_DIR)
    config = make_config(args.which, tok)
    train_stream, held_stream = token_stream(tok, "train"), token_stream(tok, "heldout")
    print(f"train tokens {len(train_stream)}, held-out tokens {len(held_stream)}", flush=True)

    def evaluate(m):
        if args.which == "llada":
            return {"heldout_elbo": heldout_elbo(m, held_stream, config.mask_token_id, config.bos_token_id)}
        return {"heldout_nll": heldout_next_token_nll(m, held_stream, config.bos_token_id)}

    model = new_model(config)
    print(f"params {sum(p.numel() for p in model.parameters())}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def loss_fn(x0, g):
        if args.which == "llada":
            return diffusion_loss(model, x0, torch.rand(args.batch, generator=g), config.mask_token_id, g)
        return next_token_loss(model, x0)

    train(model, opt, list(model.parameters()), stream=train_stream, first_id=config.bos_token_id, loss_fn=loss_fn,
          evaluate=lambda: evaluate(model), export=lambda step, log: export(model, args.which, step, log, args),
          ckpt_dir=Path(f".cache/train_tiny_{args.which}"), args=args)

if __name__ == "__main__":
    main()
