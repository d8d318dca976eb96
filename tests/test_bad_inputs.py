"""Every bad input fails fast: non-zero exit, a one-line message naming the problem, no output written,
and the input model's files unchanged."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.model.loading import resolve_path
from tests.runs import run_inprocess, tiny_config


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def model_without_mask(tmp_path_factory):
    """tiny-ar's checkpoint with every mention of a mask token removed."""
    src = Path(resolve_path("tiny-ar"))
    dst = tmp_path_factory.mktemp("nomask") / "model"
    shutil.copytree(src, dst)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        f = dst / name
        if f.exists():
            data = json.loads(f.read_text())
            data.pop("mask_token", None)
            data.pop("mask_token_id", None)
            f.write_text(json.dumps(data))
    return dst


def _case(root, **kw):
    return tiny_config(root, **kw)


CASES = {
    "sparsity_above_one": (dict(sparsity=1.5), "sparsity=1.5 must be in [0, 1)"),
    "sparsity_negative": (dict(sparsity=-0.1), "sparsity=-0.1 must be in [0, 1)"),
    "n_not_below_m": (dict(n_m="4:4"), "N must satisfy 0 < N < M"),
    "n_m_malformed": (dict(n_m="2-4"), "not of the form 'N:M'"),
    "n_m_does_not_divide": (dict(n_m="2:5"), "not divisible by 5"),
    "sparsity_disagrees_with_n_m": (dict(n_m="2:4", prune_args={"sparsity": 0.7}), "disagrees with n_m"),
    "unknown_method": (dict(method="sink_magic"), "method='sink_magic' is unknown"),
    "seqlen_above_model_max": (dict(seqlen=1024), "exceeds the model's maximum sequence length 512"),
    "targets_match_nothing": (dict(prune_args={"targets": ["no_such_layer"]}), "match no Linear layer"),
    "no_attention_visible": (dict(model_args={"attn_implementation": "eager"}), "SinkStatsCallback's probe sees only"),
    "timestep_above_one": (dict(model_args={"timesteps": [0.5, 1.5]}), "every timestep must be in (0, 1]"),
    "timestep_zero": (dict(model_args={"timesteps": [0.0, 0.5]}), "every timestep must be in (0, 1]"),
    "sink_alpha_nan": (dict(sink_args={"sink_alpha": float("nan")}), "sink_alpha=nan is not finite"),
    "sink_std_inf": (dict(sink_args={"sink_std": float("inf")}), "sink_std=inf is not finite"),
    "missing_local_model": (dict(pretrained="./no/such/model"), "has no config.json"),
    "nsamples_zero": (dict(nsamples=0), "nsamples=0 must be >= 1"),
    "missing_data_file": (dict(data_args={"dataset": "./no/such/corpus.txt"}), "neither a file nor a known source"),
    "masks_from_missing": (dict(prune_args={"masks_from": "./no/such/run"}), "no masks.safetensors there"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly(name, tmp_path):
    overrides, message = CASES[name]
    model_dir = Path(resolve_path("minilm-dlm"))
    before = _tree_digest(model_dir)
    root = tmp_path / "run"
    code, err = run_inprocess(_case(root, **overrides), tmp_path)
    assert code != 0
    assert message in err, err[-2000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (root / "pruned").exists() and not (root / "sinks").exists()
    assert _tree_digest(model_dir) == before


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run_inprocess(tiny_config(tmp_path / "run", data_args={"dataset": str(empty)}), tmp_path)
    assert code != 0 and "no text" in err
    assert not (tmp_path / "run" / "pruned").exists()


def test_dataset_smaller_than_seqlen(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words only")
    code, err = run_inprocess(tiny_config(tmp_path / "run", data_args={"dataset": str(small)}), tmp_path)
    assert code != 0 and "fewer than seqlen=64" in err


def test_existing_output_directory_is_refused(tmp_path):
    out = tmp_path / "run" / "pruned"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    code, err = run_inprocess(tiny_config(tmp_path / "run"), tmp_path)
    assert code != 0 and "already exists and is not empty" in err and "overwrite: true" in err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_missing_mask_token(tmp_path, model_without_mask):
    before = _tree_digest(model_without_mask)
    code, err = run_inprocess(tiny_config(tmp_path / "run", pretrained=str(model_without_mask)), tmp_path)
    assert code != 0 and "no mask token" in err and "mask_token_id" in err
    assert _tree_digest(model_without_mask) == before


def test_unknown_config_key(tmp_path):
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["sede"] = 1
    code, err = run_inprocess(config, tmp_path)
    assert code != 0 and "sede" in err


def test_sparsity_and_n_m_together_are_refused(capsys):
    import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["fit", "--config", "tiny_sink50", "--sparsity", "0.6", "--n-m", "2:4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --sparsity and --n-m:") and err[0].endswith("give one")
