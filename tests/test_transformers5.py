"""Loading under both transformers majors (CI runs `-m tf5` on transformers 5, everything on 4.57).

Remote code written for transformers 4.x -- like LLaDA's hub `LLaDAModelLM`, whose `__init__` never calls
`post_init()` -- fails `from_pretrained` under transformers 5 ("no attribute 'all_tied_weights_keys'");
`pipeline.model.loading.adapt_remote_code` patches such classes before `from_pretrained`.
"""
import json
import shutil

import pytest
import torch
import transformers

from pipeline.model import loading
from pipeline.model.loading import load_dlm, resolve_path
from tests.runs import run_inprocess, tiny_config
from tests.test_moe import _heldout

pytestmark = pytest.mark.tf5
torch.set_num_threads(1)
MAJOR = int(transformers.__version__.split(".")[0])


@pytest.fixture
def llada_4x_style(tmp_path):
    """tiny-llada with its `post_init()` call removed: the shape of LLaDA's hub remote code."""
    folder = tmp_path / "llada-4x"
    shutil.copytree(resolve_path("tiny-llada"), folder)
    code = (folder / "modeling_llada.py").read_text()
    assert code.count("        self.post_init()\n") == 1
    (folder / "modeling_llada.py").write_text(code.replace("        self.post_init()\n", "        pass  # 4.x style: no post_init\n"))
    return folder


def test_4x_style_remote_code_loads_with_the_same_weights(llada_4x_style):
    model, _ = load_dlm(str(llada_4x_style))
    reference, tokenizer = load_dlm("tiny-llada")
    ids = torch.randint(4, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert getattr(type(model), "_sinkprune_tf5_adapted", False) == (MAJOR >= 5)


@pytest.mark.skipif(MAJOR < 5, reason="transformers 4 loads 4.x-style remote code without help")
def test_without_the_adapter_transformers5_fails_as_reported(llada_4x_style, monkeypatch):
    monkeypatch.setattr(loading, "adapt_remote_code", lambda cls: False)
    folder = llada_4x_style.parent / "llada-4x-unadapted"  # a module of its own, never a class adapted before
    shutil.copytree(llada_4x_style, folder)
    with pytest.raises(AttributeError, match="all_tied_weights_keys"):
        load_dlm(str(folder))


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-llada-moe", "tiny-dream", "tiny-sdar"])
def test_non_persistent_buffers_are_computed_not_garbage(name):
    """transformers 5 leaves non-persistent buffers (RoPE inv_freq) as torch.empty for `_init_weights` to fill;
    4.x-era remote code fills them in `__init__` only.  Loaded buffers must equal a plain construction's."""
    model, _ = load_dlm(name)
    fresh = type(model)(model.config)
    buffers = loading._non_persistent_buffers(model)
    assert buffers, "every twin has a RoPE inv_freq buffer"
    for key in buffers:
        torch.testing.assert_close(model.get_buffer(key), fresh.get_buffer(key), rtol=0, atol=0)


def test_adapter_leaves_native_and_transformers4_classes_alone():
    assert loading.adapt_remote_code(None) is False
    assert loading.adapt_remote_code(transformers.BertForMaskedLM) is False


@pytest.mark.parametrize("pretrained,method", [("tiny-llada", "sink_wanda"), ("minilm-dlm", "sink_sparsegpt")])
def test_prune_save_reload(tmp_path, pretrained, method):
    root = tmp_path / "run"
    code, err = run_inprocess(tiny_config(root, pretrained=pretrained, method=method, n_m="2:4", nsamples=4, seqlen=64,
                                          timesteps=2), tmp_path)
    assert code == 0, err[-3000:]
    results = json.loads((root / "pruned" / "results.json").read_text())
    assert results["sparsity_report"]["meets_target"]
    saved = root / "pruned" / "model"
    load_dlm(str(saved))
    assert _heldout(saved) == results["pruned"]["heldout"]
