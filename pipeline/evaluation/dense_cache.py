"""A cache of the dense model's scores: a second run of the same recipe skips scoring the dense model.

Keyed by the sha256 of the model's weights, the held-out windows' token ids, the scoring settings (seed,
eps, held-out timesteps, mask id, tasks, lm-eval settings), torch's version and the source of the scoring
code, so any change to what would be computed misses the cache.  Entries: $SINKPRUNE_CACHE/dense_scores/
<key>.json (or $SINKPRUNE_DENSE_CACHE_DIR).  Off with EvaluateExportCallback(cache_dense=False) or SINKPRUNE_NO_DENSE_CACHE=1.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

SCORING_SOURCES = ("maths/metrics.py", "maths/diffusion.py", "evaluation/harness.py", "evaluation/likelihood.py",
                   "evaluation/scoring.py", "evaluation/offline_tasks.py", "model/module.py", "model/calibration.py",
                   "model/head.py")


def cache_dir() -> Path:
    if os.environ.get("SINKPRUNE_DENSE_CACHE_DIR"):
        return Path(os.environ["SINKPRUNE_DENSE_CACHE_DIR"])
    return Path(os.environ.get("SINKPRUNE_CACHE", Path.home() / ".cache" / "sinkprune")) / "dense_scores"


def enabled() -> bool:
    return not os.environ.get("SINKPRUNE_NO_DENSE_CACHE")


def dense_key(pl_module, settings: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(pl_module.model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for batch in pl_module.trainer.datamodule.heldout_dataloader():
        for field in ("input_ids", "keep", "index"):
            h.update(batch[field].cpu().contiguous().numpy().tobytes())
    hp = pl_module.hparams
    h.update(json.dumps({"seed": hp.seed, "eps": hp.eps, "heldout_timesteps": hp.heldout_timesteps,
                         "keep_special_tokens": hp.keep_special_tokens, "noise": getattr(hp, "noise", "mask"),
                         "mask": pl_module.mask_token_id,
                         "torch": torch.__version__, **settings}, sort_keys=True, default=str).encode())
    root = Path(__file__).resolve().parents[1]
    for source in SCORING_SOURCES:
        path = root / source
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()


def load(key: str) -> dict | None:
    path = cache_dir() / f"{key}.json"
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "heldout_windows" in entry:
        entry["heldout_windows"] = {int(k): tuple(v) for k, v in entry["heldout_windows"].items()}
    return entry


def store(key: str, entry: dict) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(entry))
        tmp.replace(folder / f"{key}.json")
    except OSError:
        pass  # a read-only cache only costs time
