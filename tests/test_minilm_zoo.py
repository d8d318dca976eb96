"""The MiniLM-based zoo models load offline from the package and have learned their objective."""
import pytest
import torch

from pipeline.model.loading import load_dlm
from pipeline.model import minilm
from pipeline.zoo.minilm_report import unigram_entropy
from pipeline.zoo.train_minilm import heldout_elbo
from pipeline.zoo.training import token_stream


@pytest.fixture(scope="module")
def streams():
    _, tok = load_dlm("minilm-dlm")
    return tok, token_stream(tok, "train"), token_stream(tok, "heldout")


@pytest.mark.parametrize("name", ["minilm-dlm", "minilm-dlm-rel", "minilm-ar"])
def test_model_loads_offline_and_beats_unigram(name, streams):
    tok, train, held = streams
    model, _ = load_dlm(name)
    variant = minilm.VARIANTS[name]
    assert getattr(model.config, "is_decoder", False) == variant.causal
    torch.manual_seed(0)
    nll = heldout_elbo(model, held, tok.mask_token_id, tok.cls_token_id, variant, n_windows=16, n_t=4)
    unigram = unigram_entropy(train, held, tok.vocab_size)
    assert nll < unigram - 0.5, (name, nll, unigram)


def test_rel_model_has_no_position_zero_row():
    """minilm-dlm-rel's position table is the wheel's shifted by one: BERT's position-0 anchor is gone."""
    base = minilm.base_masked_lm()
    rel, _ = load_dlm("minilm-dlm-rel")
    table, shifted = base.bert.embeddings.position_embeddings.weight, rel.bert.embeddings.position_embeddings.weight
    assert torch.equal(shifted[:-1], table[1:])
    assert not torch.allclose(shifted[0], table[0])
