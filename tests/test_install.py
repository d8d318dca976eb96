"""A plain (not editable) install carries the recipes and every embedded model: the wheel holds every tracked file
of configs/ and the zoo folders, and, unpacked outside the checkout, runs a recipe by name."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the tracked files: a build in the checkout would leave build/ and *.egg-info behind.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in _tracked():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                           "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(out.glob("sinkprune-*.whl"))


def _tracked(*folders: str) -> set[str]:
    done = subprocess.run(["git", "ls-files", *folders], cwd=REPO, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return set(done.stdout.split())


def test_wheel_holds_the_recipes_and_every_embedded_model(wheel):
    from pipeline.model.loading import ZOO_FOLDERS

    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f for f in _tracked("configs") if f.endswith(".yaml")}
    zoo = {f for f in _tracked("pipeline/zoo") if f.count("/") == 3 and not f.endswith(".png")}  # inside a model folder
    assert recipes and recipes <= names, sorted(recipes - names)[:5]
    assert zoo <= names, sorted(zoo - names)[:5]
    for folder in ZOO_FOLDERS:
        assert f"pipeline/zoo/{folder.replace('-', '_')}/config.json" in names, folder


def test_installed_copy_runs_a_recipe_by_name_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel unpacked is its install (less the scripts)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = ("import sys, cli; assert cli.__file__.startswith(sys.argv[1]), cli.__file__; "
            "cli.main(['fit', '--config', 'tiny_sink50', '--model.init_args.pretrained', 'tiny-llada', "
            "'--model.init_args.timesteps', '2', '--data.init_args.nsamples', '2', '--data.init_args.seqlen', '32', "
            "'--data.init_args.heldout_samples', '2', '--trainer.default_root_dir', 'run'])")
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = list(work.glob("run/**/results.json"))
    assert len(results) == 1 and '"method": "sink_wanda"' in results[0].read_text()
