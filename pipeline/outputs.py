"""Run outputs that are never half-written: checked before work starts, written to a temp dir, renamed.

A crash or Ctrl-C while saving leaves the previous state (nothing, or the old directory when
overwriting), never a partial directory under the final name.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prepare_output_dir(path, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {path} already exists and is not empty; choose a new output_dir or set overwrite: true"
        )
    return path


class AtomicDir:
    """`with AtomicDir(target) as tmp:` fill tmp; on success tmp is renamed to target in one step."""

    def __init__(self, target, overwrite: bool = False):
        self.target = Path(target).expanduser()
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        prepare_output_dir(self.target, self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        backup = None
        if self.target.exists():
            backup = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, backup)
        os.replace(self.tmp, self.target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return False


def save_model(model, tokenizer, directory: Path) -> None:
    """save_pretrained, plus the remote-code .py files so `from_pretrained(..., trust_remote_code=True)` still works."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    source = Path(str(getattr(model.config, "_name_or_path", "")))
    if source.is_dir():
        for py in source.glob("*.py"):
            if not (directory / py.name).exists():
                shutil.copy(py, directory / py.name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "lightning", "transformers", "datasets", "lm_eval", "torchmetrics"):
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            pass
    return out


def run_metadata(trainer, pl_module, callback=None) -> dict:
    dm = getattr(trainer, "datamodule", None)
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "world_size": trainer.world_size,
        "model_hparams": dict(getattr(pl_module, "hparams", {})),
        "data_hparams": dict(getattr(dm, "hparams", {})) if dm is not None else None,
        "resolved_config": getattr(pl_module, "resolved_config", None),
        "callback": {k: v for k, v in vars(callback).items() if isinstance(v, (int, float, str, bool, type(None), tuple))} if callback else None,
    }
