"""Output files are readable like any file the user writes: the umask decides their mode (safetensors alone
would write masks.safetensors and model.safetensors 0600, unreadable to the group on a shared cluster)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.runs import REPO, cli_command, tiny_config


def test_every_output_file_has_the_umask_mode(tmp_path):
    config = tiny_config(tmp_path / "run", nsamples=2, seqlen=32, timesteps=2, prune_args={"tasks": [], "score": False},
                         model_args={"score_dense": False})
    argv, env = cli_command(config, tmp_path)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, umask=0o027)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted((tmp_path / "run").rglob("*"))
    names = {p.name for p in written}
    assert {"masks.safetensors", "model.safetensors", "results.json", "sinks.json"} <= names, names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {name: oct(0o750 if (tmp_path / name).is_dir() else 0o640) for name in modes}


def test_materialized_minilm_cache_has_the_umask_mode(tmp_path):
    """The embedded model's cache folder (built in a mkdtemp folder, 0700) is shared like any other file."""
    code = ("import os; os.umask(0o022); from pipeline.model.minilm import materialize; print(materialize('minilm-dlm'))")
    env = dict(os.environ, SINKPRUNE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    written = [folder, *folder.rglob("*")]
    assert "model.safetensors" in {p.name for p in written}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == \
           {p.name: oct(0o755 if p.is_dir() else 0o644) for p in written}
