"""Popup layers: exact top-k, deterministic ties, straight-through gradient, eval cache, conv variants."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from timm_popup import PopupConv2d, PopupLinear, topk_mask
from timm_popup.layers import num_kept


@pytest.mark.parametrize("n", [7, 1000, 70_000, 300_001])
@pytest.mark.parametrize("k", [0.1, 0.3, 0.5, 0.7, 1.0])
def test_topk_keeps_exactly_round_kn_largest(n, k):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == round(k * n)
    if 0 < round(k * n) < n:
        assert scores.abs()[mask].min() > scores.abs()[~mask].max()


def test_topk_structured_scores_still_exact():
    # Sorted / periodic scores defeat a strided sample; the result must stay exact.
    for scores in (torch.arange(200_000.0), torch.arange(200_000.0).flip(0), (torch.arange(200_000) % 4096).float()):
        mask = topk_mask(scores, 0.3)
        assert int(mask.sum()) == 60_000
        expected = torch.zeros(200_000, dtype=torch.bool)
        order = torch.sort(scores.abs(), descending=True, stable=True).indices
        expected[order[:60_000]] = True
        assert torch.equal(mask, expected)


def test_ties_go_to_lowest_index():
    scores = torch.tensor([1.0, 2.0, 2.0, -2.0, 2.0, 0.5])
    mask = topk_mask(scores, 0.5)  # keep 3 of the four |2|s: the first three
    assert mask.tolist() == [False, True, True, True, False, False]
    assert topk_mask(torch.zeros(100_000), 0.3).nonzero().flatten().tolist() == list(range(30_000))


def test_num_kept_is_python_round():
    assert num_kept(10, 0.25) == 2 and num_kept(10, 0.35) == round(3.5) and num_kept(5, 0.5) == 2


def test_linear_score_gradient_is_paper_eq5():
    torch.manual_seed(0)
    layer = PopupLinear(6, 4, k=0.5, weight_init="kaiming_normal", seed=3, name="fc")
    with torch.no_grad():
        layer.scores.copy_(torch.rand(4, 6) + 0.1)  # positive scores: |s| = s, eq. 5 applies as written
        layer.scores[0, 0] *= -1  # one negative score: abs() flips its gradient
    x = torch.randn(5, 6)
    target = torch.randn(5, 4)
    out = layer(x)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    mask = layer.get_mask()
    assert torch.allclose(out, x @ (layer.weight * mask).T)
    d_loss_d_i = 2 * (out - target).detach()  # dL/dI_v for each sample and output node v
    expected = torch.einsum("bv,vu,bu->vu", d_loss_d_i, layer.weight, x)  # sum_b dL/dI_v w_uv Z_u
    expected[0, 0] *= -1
    assert torch.allclose(layer.scores.grad, expected, atol=1e-5)


def test_layer_matches_dense_conv_with_masked_weight():
    layer = PopupConv2d(4, 6, 3, stride=2, padding=1, k=0.3, name="c", seed=1).eval()
    x = torch.randn(2, 4, 9, 9)
    w = layer.weight * layer.get_mask()
    assert torch.equal(layer(x), F.conv2d(x, w, None, 2, 1))
    assert layer.get_mask().shape == layer.weight.shape and layer.get_mask().dtype == torch.bool


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2),
    dict(kernel_size=3, padding=1, groups=4),
    dict(kernel_size=3, padding=1, groups=8),  # depthwise
    dict(kernel_size=1, stride=2),
    dict(kernel_size=(1, 7), padding=(0, 3)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
])
def test_conv_variants_follow_dense_semantics(kwargs):
    dense = nn.Conv2d(8, 16, bias=True, **kwargs)
    popup = PopupConv2d.from_dense(dense, k=0.5, weight_init="kaiming_normal", seed=0, name="conv").eval()
    with torch.no_grad():
        dense.weight.copy_(popup.weight * popup.get_mask())
        dense.bias.zero_()
    x = torch.randn(2, 8, 11, 13)
    assert torch.allclose(popup(x), dense(x), atol=1e-6)


def test_same_padding_conv():
    dense = Conv2dSame(3, 5, 3, stride=2, bias=False)
    popup = PopupConv2d.from_dense(dense, k=0.5, weight_init="kaiming_normal", seed=0, name="c", same_pad=True).eval()
    with torch.no_grad():
        dense.weight.copy_(popup.weight * popup.get_mask())
    x = torch.randn(1, 3, 10, 15)
    assert torch.allclose(popup(x), dense(x), atol=1e-6)


def test_eval_mask_is_cached_until_scores_change():
    layer = PopupLinear(50, 40, k=0.5, name="fc").eval()
    m1 = layer.get_mask()
    assert layer.get_mask() is m1  # cached, not recomputed
    with torch.no_grad():
        layer.scores.mul_(-1).add_(torch.randn_like(layer.scores))
    m2 = layer.get_mask()
    assert m2 is not m1 and not torch.equal(m1, m2)
    assert torch.equal(m2, topk_mask(layer.scores, 0.5))
    layer.k = 0.2
    assert int(layer.get_mask().sum()) == round(0.2 * 2000)


def test_only_scores_are_parameters_and_weights_are_not_in_state_dict():
    layer = PopupConv2d(3, 8, 3, bias=True, name="c")
    assert [n for n, _ in layer.named_parameters()] == ["scores"]
    assert list(layer.state_dict()) == ["scores"]
    assert torch.equal(layer.bias, torch.zeros(8))


def test_bad_k_and_init():
    with pytest.raises(ValueError, match="outside"):
        PopupLinear(4, 4, k=1.5)
    with pytest.raises(ValueError, match="unknown weight_init"):
        PopupLinear(4, 4, weight_init="nope")
