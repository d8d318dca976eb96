"""Mask-token resolution, the forward process, window sampling and the masked-diffusion ELBO."""
import pytest
import torch

from pipeline.model.data import CalibrationData
from pipeline.maths.diffusion import forward_process, mask_probability, noise_seed, per_sample_uniform, timestep_grid
from pipeline.model.loading import resolve_mask_token_id, resolve_path
from pipeline.maths.metrics import MaskedDiffusionPerplexity, elbo_nll


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Tok:
    def __init__(self, mask_token_id=None):
        self.mask_token_id = mask_token_id


def test_mask_token_resolution_order():
    assert resolve_mask_token_id(_Tok(7), _Cfg(mask_token_id=9)) == 7
    assert resolve_mask_token_id(_Tok(None), _Cfg(mask_token_id=9)) == 9
    assert resolve_mask_token_id(_Tok(7), _Cfg(), explicit=3) == 3
    assert resolve_mask_token_id(_Tok(None), _Cfg(model_type="llada")) == 126336
    assert resolve_mask_token_id(_Tok(None), _Cfg(model_type="dream")) == 151666


def test_mask_token_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="no mask token.*mask_token_id"):
        resolve_mask_token_id(_Tok(None), _Cfg(model_type="gpt2"))


def test_embedded_minilm_mask_id(minilm):
    model, tok = minilm
    assert resolve_mask_token_id(tok, model.config) == tok.convert_tokens_to_ids("[MASK]")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_path(str(tmp_path / "nope"))


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_masking_rate_matches_t(t):
    x = torch.randint(5, 100, (64, 256))
    noisy, masked, p = forward_process(x, t, mask_token_id=1, generator=torch.Generator().manual_seed(0))
    rate = masked.float().mean().item()
    expected = (1 - 1e-3) * t + 1e-3
    assert abs(rate - expected) < 0.01
    assert torch.equal(noisy[masked], torch.ones(int(masked.sum()), dtype=torch.long))
    assert torch.equal(noisy[~masked], x[~masked])
    assert torch.allclose(p, mask_probability(t).expand(64, 1))


def test_prompt_positions_are_kept():
    x = torch.randint(5, 100, (8, 32))
    keep = torch.zeros_like(x, dtype=torch.bool)
    keep[:, :10] = True
    noisy, masked, _ = forward_process(x, 1.0, mask_token_id=1, keep=keep, generator=torch.Generator().manual_seed(0))
    assert not masked[:, :10].any() and masked[:, 10:].all()
    assert torch.equal(noisy[:, :10], x[:, :10])


def test_noise_depends_only_on_seed_sample_and_step():
    a = per_sample_uniform((2, 16), [noise_seed(0, 5, 3), noise_seed(0, 6, 3)])
    b = per_sample_uniform((1, 16), [noise_seed(0, 6, 3)])
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert timestep_grid(10) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def _data(seed, nsamples=8):
    dm = CalibrationData(tokenizer="minilm-dlm", nsamples=nsamples, seqlen=64, seed=seed, heldout_samples=4)
    dm.setup("fit")
    return dm


def test_windows_reproducible_from_seed():
    a, b, c = _data(0), _data(0), _data(1)
    assert torch.equal(a.calibration.windows, b.calibration.windows)
    assert not torch.equal(a.calibration.windows, c.calibration.windows)
    assert a.calibration.windows.shape == (8, 64)
    cls_id = a._tokenizer().cls_token_id
    assert (a.calibration.windows[:, 0] == cls_id).all()
    assert a.calibration[0]["keep"][0] and not a.calibration[0]["keep"][1:].any()
    # held-out windows come from held-out articles: none equals a calibration window
    assert torch.equal(a.heldout.windows, c.heldout.windows)


def test_too_little_text_is_a_clear_error(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few words")
    dm = CalibrationData(tokenizer="minilm-dlm", dataset=str(f), nsamples=4, seqlen=64)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        dm.setup("fit")


def _elbo(model, ids, keep, mask_id, seed=0):
    nll, scored = elbo_nll(lambda x: model(input_ids=x).logits, ids, keep, list(range(len(ids))), mask_id, n_timesteps=4, seed=seed)
    metric = MaskedDiffusionPerplexity()
    metric.update(nll, scored)
    return metric.compute()


def test_elbo_identical_for_identical_seeds_and_trained_beats_random(minilm):
    model, tok = minilm
    dm = _data(0)
    ids, keep = dm.heldout.windows[:4], torch.stack([dm.heldout[i]["keep"] for i in range(4)])
    a, b = _elbo(model, ids, keep, tok.mask_token_id), _elbo(model, ids, keep, tok.mask_token_id)
    assert a == b
    assert _elbo(model, ids, keep, tok.mask_token_id, seed=1)["nll"] != a["nll"]
    torch.manual_seed(0)
    random_model = type(model)(model.config).eval()
    r = _elbo(random_model, ids, keep, tok.mask_token_id)
    assert a["nll"] < r["nll"] - 1.0


def test_model_too_big_for_the_gpu_is_a_clear_error(monkeypatch, minilm):
    """Before Lightning moves the weights: the numbers and the fix, not a CUDA OOM traceback."""
    from pipeline.model.module import check_fits

    model, _ = minilm
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**20, 80 * 2**30))  # 10 MiB free
    with pytest.raises(RuntimeError, match=r"minilm-dlm needs 0\.\d GiB .* cuda:0 has 0\.0 GiB free of 80\.0 GiB: .*torch_dtype: bfloat16"):
        check_fits(model, torch.device("cuda:0"), "minilm-dlm")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    check_fits(model, torch.device("cuda:0"), "minilm-dlm")  # fits
    check_fits(model, torch.device("cpu"), "minilm-dlm")     # CPU runs are not checked
