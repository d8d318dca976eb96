"""Output files are readable like any file the user writes: the umask decides their mode (safetensors alone
would write masks.safetensors and model.safetensors 0600, unreadable to the group on a shared cluster)."""
from __future__ import annotations

import subprocess

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
