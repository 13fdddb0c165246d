"""Masked tensors: exact top-k, deterministic ties, straight-through gradient, eval cache, any module kind."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from timm_popup import convert, popup_masks, topk_mask
from timm_popup.layers import PopupMask, num_kept


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


def _popup(module: nn.Module, **kwargs) -> nn.Module:
    return convert(module, **{"k": 0.5, "weight_init": "kaiming_normal", "seed": 0, **kwargs})


def test_linear_score_gradient_is_paper_eq5():
    torch.manual_seed(0)
    layer = _popup(nn.Linear(6, 4, bias=False), seed=3)
    mask_module = popup_masks(layer)["weight"]
    with torch.no_grad():
        mask_module.scores.copy_(torch.rand(4, 6) + 0.1)  # positive scores: |s| = s, eq. 5 applies as written
        mask_module.scores[0, 0] *= -1  # one negative score: abs() flips its gradient
    x = torch.randn(5, 6)
    target = torch.randn(5, 4)
    out = layer(x)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    mask = mask_module.get_mask()
    assert torch.allclose(out, x @ (mask_module.weight * mask).T)
    d_loss_d_i = 2 * (out - target).detach()  # dL/dI_v for each sample and output node v
    expected = torch.einsum("bv,vu,bu->vu", d_loss_d_i, mask_module.weight, x)  # sum_b dL/dI_v w_uv Z_u
    expected[0, 0] *= -1
    assert torch.allclose(mask_module.scores.grad, expected, atol=1e-5)


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
    conv = nn.Conv2d(8, 16, bias=True, **kwargs)
    popup = _popup(conv).eval()
    assert type(popup).__mro__[1] is nn.Conv2d  # parametrize subclasses the module's own class
    mask = popup_masks(popup)["weight"]
    x = torch.randn(2, 8, 11, 13)
    expected = F.conv2d(F.pad(x, popup._reversed_padding_repeated_twice, mode="reflect") if
                        popup.padding_mode == "reflect" else x, mask.weight * mask.get_mask(), None, popup.stride,
                        0 if popup.padding_mode == "reflect" else popup.padding, popup.dilation, popup.groups)
    assert torch.equal(popup(x), expected)
    assert torch.equal(popup.bias, torch.zeros(16))  # the paper's layers have no bias: pinned at zero


def test_same_padding_conv_keeps_timms_padding():
    dense = Conv2dSame(3, 5, 3, stride=2, bias=False)
    popup = _popup(Conv2dSame(3, 5, 3, stride=2, bias=False)).eval()
    mask = popup_masks(popup)["weight"]
    with torch.no_grad():
        dense.weight.copy_(mask.weight * mask.get_mask())
    x = torch.randn(1, 3, 10, 15)
    assert torch.equal(popup(x), dense(x))


@pytest.mark.parametrize("make", [
    lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: nn.Conv3d(2, 4, 3), lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
    lambda: nn.Embedding(10, 8), lambda: nn.LSTM(4, 6, batch_first=True), lambda: nn.GRU(4, 6),
    lambda: nn.MultiheadAttention(8, 2),
])
def test_every_module_kind_reads_its_masked_weight(make):
    """Any module with weight tensors: each is masked where the module reads it, and only scores learn."""
    module = _popup(make(), k=0.3)
    masks = popup_masks(module)
    assert masks and all(m.get_mask().sum() == round(0.3 * m.weight.numel()) for m in masks.values())
    assert {n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()} == {"scores"}
    if isinstance(module, nn.Embedding):
        x = torch.tensor([[1, 2, 3]])
    elif isinstance(module, nn.MultiheadAttention):
        x = torch.randn(3, 2, 8)
    elif isinstance(module, (nn.LSTM, nn.GRU)):
        x = torch.randn(2, 5, 4)
    else:
        x = torch.randn(2, module.in_channels, *([6] * (module.weight.ndim - 2)))
    out = module(x, x, x) if isinstance(module, nn.MultiheadAttention) else module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).sum().backward()
    for name, mask in masks.items():
        assert mask.scores.grad is not None and mask.scores.grad.abs().sum() > 0, name
    # the same module with the masked values as plain weights computes the same thing
    plain = make()
    with torch.no_grad():
        for name, mask in masks.items():
            plain.get_parameter(name).copy_(mask.weight * mask.get_mask())
        for name, p in plain.named_parameters():
            if name not in masks:
                p.copy_(module.get_buffer(name))
    module.eval(), plain.eval()
    with torch.no_grad():
        got = module(x, x, x) if isinstance(module, nn.MultiheadAttention) else module(x)
        want = plain(x, x, x) if isinstance(plain, nn.MultiheadAttention) else plain(x)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    assert torch.equal(got, want)


def test_eval_mask_is_cached_until_scores_change():
    layer = _popup(nn.Linear(50, 40)).eval()
    mask = popup_masks(layer)["weight"]
    m1 = mask.get_mask()
    assert mask.get_mask() is m1  # cached, not recomputed
    with torch.no_grad():
        assert layer.weight is layer.weight  # the masked weight too (inference)
    with torch.no_grad():
        mask.scores.mul_(-1).add_(torch.randn_like(mask.scores))
    m2 = mask.get_mask()
    assert m2 is not m1 and not torch.equal(m1, m2)
    assert torch.equal(m2, topk_mask(mask.scores, 0.5))
    mask.k = 0.2
    assert int(mask.get_mask().sum()) == round(0.2 * 2000)


def test_only_scores_are_parameters_and_weights_are_not_in_state_dict():
    layer = _popup(nn.Conv2d(3, 8, 3, bias=True))
    assert [n for n, _ in layer.named_parameters()] == ["parametrizations.weight.0.scores"]
    assert list(layer.state_dict()) == ["parametrizations.weight.0.scores"]
    assert torch.equal(layer.bias, torch.zeros(8))


def test_bad_k_and_init():
    with pytest.raises(ValueError, match="outside"):
        PopupMask((4, 4), name="w", k=1.5, weight_init="signed_constant", seed=0)
    with pytest.raises(ValueError, match="unknown weight_init"):
        PopupMask((4, 4), name="w", k=0.5, weight_init="nope", seed=0)
