"""tests/reference_formulas.py against hand computations on small tensors (docs/reference.md)."""
import math

import pytest
import torch

from tests import reference_formulas as rf


def test_sink_scores_by_hand():
    mass = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    # mean 2, population std sqrt((1+1+1+9)/4) = sqrt(3); threshold 2 + 2·sqrt(3)
    thr = 2 + 2 * math.sqrt(3)
    expected = [1 / (1 + math.exp(-5 * (v - thr))) for v in (1.0, 1.0, 1.0, 5.0)]
    torch.testing.assert_close(rf.collector_sink_scores(mass), torch.tensor([expected], dtype=torch.float64))
    flat = rf.collector_sink_scores(torch.full((2, 3), 7.0))
    torch.testing.assert_close(flat, torch.full((2, 3), 0.5, dtype=torch.float64))  # std 0: sigmoid(0)


def test_attention_mass_by_hand_and_gqa():
    # one head, d=1: q = [0, 0] gives uniform attention; two queries over two keys -> mass [1, 1]
    q = torch.zeros(1, 1, 2, 1)
    k = torch.tensor([[[[1.0], [2.0]]]])
    torch.testing.assert_close(rf.collector_attention_mass(q, k), torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    # q = [ln 3] against k = [0, 1]: softmax([0, ln 3]) = [1/4, 3/4]
    q = torch.full((1, 1, 1, 1), math.log(3.0))
    k = torch.tensor([[[[0.0], [1.0]]]])
    torch.testing.assert_close(rf.collector_attention_mass(q, k), torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    # GQA: 2 query heads share one key head -> twice the one-head mass
    torch.testing.assert_close(rf.collector_attention_mass(q.repeat(1, 2, 1, 1), k), torch.tensor([[0.5, 1.5]], dtype=torch.float64))
    # every query row sums to 1: total mass = heads · queries
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g)
    torch.testing.assert_close(rf.collector_attention_mass(q, k).sum(dim=1), torch.full((2,), 20.0, dtype=torch.float64))


def test_wanda_norm_sum_is_a_sum_of_per_batch_norms():
    # batch 1: x rows [3, 0] and [4, 1], s = [0, 0]        -> column norms [5, 1]
    # batch 2: x rows [6, 8], [0, 0], s = [0.5, 1]         -> x⊙(1−s) rows [3, 4], [0, 0] -> [3, 4]
    b1 = (torch.tensor([[[3.0, 0.0], [4.0, 1.0]]]), torch.zeros(1, 2))
    b2 = (torch.tensor([[[6.0, 8.0], [5.0, 5.0]]]), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(rf.wanda_norm_sum([b1, b2]), torch.tensor([8.0, 5.0], dtype=torch.float64))
    # not the root of summed squares: that would be sqrt(25+9) and sqrt(1+16)
    assert rf.wanda_norm_sum([b1, b2])[0] != pytest.approx(math.sqrt(34))
    # a batch of two samples is ONE norm over both samples' rows
    both = (torch.cat([b1[0], torch.tensor([[[0.0, 0.0], [12.0, 0.0]]])]), torch.zeros(2, 2))
    torch.testing.assert_close(rf.wanda_norm_sum([both]), torch.tensor([13.0, 1.0], dtype=torch.float64))


def test_sink_wanda_mask_per_row_without_square_root():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    norms = torch.tensor([4.0, 1.0, 1.0, 0.25])  # metric rows: [4, 2, 3, 1], [16, 3, 2, 0.25]
    mask = rf.sink_wanda_mask(w, norms, 0.5)
    assert mask.tolist() == [[False, True, False, True], [False, False, True, True]]
    # with a square root the first row would be [2, 2, 3, 0.5]: 0.5, then the tie at 2 goes to the earlier column
    assert rf.per_row_lowest(torch.tensor([[2.0, 2.0, 3.0, 0.5]]), 2).tolist() == [[True, False, False, True]]


def test_timestep_mean_and_weighted_hessian_by_hand():
    s_bar = rf.mean_over_timesteps([torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]])])
    torch.testing.assert_close(s_bar, torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    # window 1: rows [1, 2] (w 0.75) and [2, 0] (w 0.5) -> [0.75, 1.5], [1, 0]
    x1 = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    # window 2: one row [1, 1], weight 1
    x2 = torch.tensor([[1.0, 1.0]])
    h = rf.weighted_hessian([x1, x2], [s_bar[0], torch.zeros(1)])
    xtx = torch.tensor([[0.5625 + 1 + 1, 1.125 + 1], [1.125 + 1, 2.25 + 1]], dtype=torch.float64)
    torch.testing.assert_close(h, xtx * (2.0 / 2))


def test_blockwise_threshold_is_one_threshold_per_block_over_all_rows():
    sal = torch.tensor([[1.0, 2.0, 9.0, 10.0], [3.0, 4.0, 11.0, 12.0]])
    # blocksize 2, sparsity 0.5: block 1 sorted [1, 2, 3, 4], index int(4·0.5) = 2 -> thresh 3: prune 1, 2, 3;
    # block 2 sorted [9, 10, 11, 12] -> thresh 11: prune 9, 10, 11
    mask = rf.blockwise_threshold_mask(sal, 0.5, blocksize=2)
    assert mask.tolist() == [[True, True, True, True], [True, False, True, False]]
    # rows end with different sparsity (4/4 and 2/4); each block prunes int(numel·s) + 1 = 3 entries
    assert mask.sum(dim=1).tolist() == [4, 2]
    assert [int(mask[:, i:i + 2].sum()) for i in (0, 2)] == [3, 3]


def test_layerwise_magnitude_threshold():
    w = torch.tensor([[0.1, -0.2, 0.3], [-5.0, 6.0, 7.0]])
    # sorted |W| = [.1, .2, .3, 5, 6, 7], index int(6·0.5)=3 -> 5: prunes 4 entries, the whole first row
    assert rf.layerwise_threshold_mask(w, 0.5).tolist() == [[True, True, True], [True, False, False]]


def test_formulas_that_the_project_shares_agree_with_it():
    """Sink scores, attention mass and the weighted Hessian are the same in both flavours (docs/reference.md)."""
    from pipeline.maths import sparsity as sp
    from pipeline.maths.attention import attention_mass
    from pipeline.maths.sinks import sink_scores

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mass = attention_mass(q, k)
    torch.testing.assert_close(mass.double(), rf.collector_attention_mass(q, k), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sink_scores(mass).double(), rf.collector_sink_scores(mass), rtol=1e-5, atol=1e-6)
    x, s = torch.randn(3, 9, 5, generator=g), torch.rand(3, 9, generator=g)
    acc = torch.zeros(5, 5)
    for b in range(3):
        sp.add_sample_hessian_(acc, x[b], 1.0 - s[b])
    torch.testing.assert_close(acc.double() * (2.0 / 3), rf.weighted_hessian(list(x), list(s)), rtol=1e-5, atol=1e-5)
