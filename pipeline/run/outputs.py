"""Run outputs that are never half-written: checked before work starts, written to a temp dir, renamed.

A crash or Ctrl-C while saving leaves the previous state (nothing, or the old directory when
overwriting), never a partial directory under the final name.  Every directory this tool writes holds a
marker file (`MARKER`); `overwrite: true` replaces only such a directory (or an empty one), never a
folder the tool did not write, and never one that holds or lies inside an input (`check_not_input`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


MARKER = ".sinkprune-output"


def prepare_output_dir(path, overwrite: bool, field: str = "output_dir") -> Path:
    """Refuse an existing non-empty directory unless overwrite is set and this tool wrote it (MARKER)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{field}={path} is a file; choose a directory path that does not exist")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{field}={path}: output directory {path} already exists and is not empty; choose a new {field}, or "
                f"--overwrite (overwrite: true) replaces a previous run's output"
            )
        if not (path / MARKER).is_file():
            raise FileExistsError(
                f"{field}={path} exists and was not written by sinkprune (no {MARKER} in it), so overwrite: true "
                f"will not replace it; choose a new {field}"
            )
    return path


def run_folder(root, taken) -> Path:
    """Lightning's `version_N` convention, where the run folder itself is the first run: `root` while no
    previous run's results are in it, else `root/version_N`: the last one while it holds no results (a
    stopped run's, or the one another rank of this run has just made), otherwise the next number.
    `taken(folder)` says whether a folder holds results this run would write."""
    root = Path(root).expanduser()
    if not taken(root):
        return root
    numbers = sorted(int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()) if root.is_dir() else []
    last = root / f"version_{numbers[-1]}" if numbers else root
    return last if not taken(last) else root / f"version_{numbers[-1] + 1 if numbers else 1}"


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()


def check_not_input(field: str, output, inputs: dict[str, Path | str], contains_ok: bool = False) -> None:
    """Refuse an output location that equals, contains or lies inside an input (a model folder, dataset,
    masks_from folder, checkpoint).  contains_ok: the output is only a root this tool writes new
    subfolders into (trainer.default_root_dir), so holding an input is harmless."""
    out = _resolved(output)
    for in_field, value in inputs.items():
        src = _resolved(value)
        inside = out == src or src in out.parents
        if inside or (not contains_ok and out in src.parents):
            how = "is" if out == src else ("lies inside" if inside else "contains")
            raise ValueError(f"{field}={output} {how} the input {in_field}={value}; inputs are never written, "
                             f"choose an output path outside it")


def check_writable(field: str, path, needed_bytes: int = 0) -> None:
    """Before any work: no component of the path is a file, its nearest existing folder accepts a new file,
    and that disk has room for needed_bytes."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or (existing == path and not path.is_dir()):
        raise NotADirectoryError(f"{field}={path}: {existing} is a file, not a folder; choose another path")
    probe = existing / f".sinkprune-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"{field}={path}: cannot write in {existing} ({exc.strerror}); choose a writable location") from None
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise OSError(f"{field}={path}: the outputs need about {needed_bytes / 2**20:.0f} MiB but {existing} has "
                      f"{free / 2**20:.0f} MiB free; free space or choose another disk")


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
        (self.tmp / MARKER).write_text("written by sinkprune; `overwrite: true` may replace this folder\n")
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        honour_umask(self.tmp)
        backup = None
        if self.target.exists():
            backup = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, backup)
        os.replace(self.tmp, self.target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return False


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it, and another
    thread creating a file in between would get the temporary value)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give `folder` and everything under it the mode a plain open() would (0644 under umask 022): safetensors writes
    its files 0600, which would keep a shared cluster's group from reading the masks and the model."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            path.chmod((0o666 | path.stat().st_mode & 0o111) & ~mask)


def save_model(model, tokenizer, directory: Path, quantized=None) -> None:
    """save_pretrained, plus the remote-code .py files so `from_pretrained(..., trust_remote_code=True)` still works.
    quantized (a QuantizeOutcome: scheme, scales): in the compressed-tensors format (pipeline/run/compressed.py)."""
    if quantized is not None:
        from pipeline.run.compressed import save_compressed

        save_compressed(model, directory, quantized.packed_scales, quantized.scheme)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    source = Path(str(getattr(model.config, "_name_or_path", "")))
    if source.is_dir():
        for py in source.glob("*.py"):
            if not (directory / py.name).exists():
                shutil.copy(py, directory / py.name)


def save_pruned(out, results: dict, masks: dict, model=None, tokenizer=None, overwrite: bool = False,
                quantized=None) -> float:
    """masks.safetensors, the model (when given) and results.json into `out`, all or nothing (AtomicDir).

    results.json is written last, with the time spent saving so far as timings.save_s and
    phase_timings.saving (the rename that follows takes no measurable time).  Returns the seconds spent."""
    import json
    import time

    import torch
    from safetensors.torch import save_file

    from pipeline.run.console import track

    start = time.time()
    steps = ["masks", "model", "results"] if model is not None else ["masks", "results"]
    with AtomicDir(out, overwrite=overwrite) as tmp:
        for step in track(steps, "saving", unit="files", record=False):
            if step == "masks":
                save_file({n: m.to(torch.uint8).contiguous() for n, m in masks.items()}, str(tmp / "masks.safetensors"))
            elif step == "model":
                save_model(model, tokenizer, tmp / "model", quantized)
            else:
                seconds = time.time() - start
                results.setdefault("timings", {})["save_s"] = seconds
                results.setdefault("phase_timings", {})["saving"] = seconds
                (tmp / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return time.time() - start


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


def run_metadata(trainer, pl_module, settings=None) -> dict:
    """Where and with what a run ran; `settings`: the pruning's own (PruneOutcome.settings)."""
    dm = getattr(trainer, "datamodule", None)
    return {
        "git_commit": git_commit(),
        "versions": package_versions(),
        "world_size": trainer.world_size,
        "model_hparams": dict(getattr(pl_module, "hparams", {})),
        "data_hparams": dict(getattr(dm, "hparams", {})) if dm is not None else None,
        "resolved_config": getattr(pl_module, "resolved_config", None),
        "callback": dict(settings) if settings is not None else None,
    }
