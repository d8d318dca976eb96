"""Small end-to-end runs of `cli.py fit` on the embedded model, as a user would start them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


EVALUATE_KEYS = ("output_dir", "overwrite", "save_model", "score", "score_dense", "tasks", "score_dense_tasks", "eval_kwargs",
                 "cache_dense")


def tiny_config(root: Path, *, method: str | None = "sink_wanda", sparsity=0.5, n_m=None, nsamples=6, seqlen=64,
                timesteps=3, batch_size=2, pretrained="minilm-dlm", prune_args=None, sink_args=None,
                model_args=None, data_args=None, trainer_args=None) -> dict:
    """A small run.  `prune_args` may also hold EvaluateExportCallback's keys (EVALUATE_KEYS), and
    `model_args` its `score_dense`: they go to that callback, listed last."""
    prune_args, model_args = dict(prune_args or {}), dict(model_args or {})
    evaluate = {"output_dir": str(root / "pruned"), "cache_dense": False}  # tests score the dense model themselves
    evaluate.update({k: prune_args.pop(k) for k in EVALUATE_KEYS if k in prune_args})
    if "score_dense" in model_args:
        evaluate["score_dense"] = model_args.pop("score_dense")
    callbacks = []
    if method is not None and method.startswith("sink_"):
        callbacks.append({"class_path": "callbacks.sink_stats.SinkStatsCallback",
                          "init_args": {"output_dir": str(root / "sinks"), **(sink_args or {})}})
    if method is not None:
        prune = {"method": method, **prune_args}
        prune.update({"n_m": n_m} if n_m else {"sparsity": sparsity})
        callbacks.append({"class_path": "callbacks.prune.PruneCallback", "init_args": prune})
    callbacks.append({"class_path": "callbacks.evaluate.EvaluateExportCallback", "init_args": evaluate})
    return {
        "model": {"class_path": "pipeline.model.module.DLMModule",
                  "init_args": {"pretrained": pretrained, "timesteps": timesteps, "heldout_timesteps": 2, **model_args}},
        "data": {"class_path": "pipeline.model.data.CalibrationData",
                 "init_args": {"nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size, "heldout_samples": 4, **(data_args or {})}},
        "trainer": {"default_root_dir": str(root), "accelerator": "cpu", "devices": 1, "callbacks": callbacks, **(trainer_args or {})},
    }


def cli_command(config: dict, tmp_path: Path, *extra: str) -> tuple[list[str], dict]:
    """(argv, env) of `cli.py fit` on `config` (written to tmp_path), one thread, offline."""
    path = tmp_path / f"config-{abs(hash(str(config)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return [sys.executable, "cli.py", "fit", "--config", str(path), *extra], env


def run_cli(config: dict, tmp_path: Path, *extra: str, timeout=900) -> subprocess.CompletedProcess:
    argv, env = cli_command(config, tmp_path, *extra)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_inprocess(config: dict, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """`cli.py fit` in this process (no interpreter start-up): (exit code, stderr)."""
    import contextlib
    import io

    import cli

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            cli.main(["fit", "--config", str(path), *extra])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()
