"""The fused C kernels and their pure-PyTorch fallback: bit-identical to layers.py / init.py, sync-free, and a
failing compiler degrades to the fallback cleanly."""

from __future__ import annotations

import math
import os
import stat
import warnings

import numpy as np
import pytest
import torch

from timm_popup import layers, native

try:
    from reference_topk import reference_topk_mask
except ImportError:  # tests/ turned into a package
    from tests.reference_topk import reference_topk_mask

from timm_popup.init import draw_reference as _draw
from timm_popup.init import splitmix64 as _bits

SIZES = [1, 7, 9, 1000, 70_001, 300_001]


def _patterns(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return {
        "random": torch.randn(n, generator=gen),
        "sorted": torch.arange(n, dtype=torch.float32),
        "reversed": -torch.arange(n, dtype=torch.float32),  # negative: |s| is what counts
        "periodic": (torch.arange(n) % 97).float() - 48.0,  # many ties, +-v tie too
        "tied": torch.full((n,), 0.25),
        "zero_one": torch.randint(0, 2, (n,), generator=gen).float(),
    }


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # compares -0.0 and 0.0 as different


@pytest.fixture
def fallback(monkeypatch):
    """The pure-PyTorch path, as on a machine without a compiler."""
    monkeypatch.setattr(native, "_library", lambda: None)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten library: the next call compiles (or fails) anew."""
    monkeypatch.setenv("TIMM_POPUP_CACHE", str(tmp_path / "cache"))
    native._reset()
    yield tmp_path / "cache"
    native._reset()


def _ks(n: int) -> list[float]:
    # k in {0.1, 0.5, 0.9}, plus keeping exactly 1, exactly n and (a k that rounds to) none
    return [0.1, 0.5, 0.9, 1.0 / n if n > 2 else 1.0, 1.0, 0.4 / n]


@pytest.mark.parametrize("n", SIZES)
def test_mask_matches_layers_with_and_without_hints(n):
    assert native.available()
    for name, scores in _patterns(n).items():
        for k in _ks(n):
            expected = reference_topk_mask(scores, k)
            assert torch.equal(native.topk_mask(scores, k), expected), (name, k)
            hint = native.new_hint()
            native.topk_mask(scores, k, hint)  # sets the hint: the second call takes the one-pass route
            assert torch.equal(native.topk_mask(scores, k, hint), expected), (name, k)
            wrongs = ([0.0, 1e-30], [1e6, 1e7], [2.0, 1.0], [0.0, math.inf]) if k in (0.1, 0.5) else ()
            for wrong in wrongs:  # below, above, unordered, everything (the band overflows)
                got = native.topk_mask(scores, k, torch.tensor(wrong, dtype=torch.float64))
                assert torch.equal(got, expected), (name, k, wrong)


@pytest.mark.parametrize("n", [1000, 300_001])
def test_hint_follows_drifting_scores(n):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(0))
    hint = native.new_hint()
    for step in range(6):
        assert torch.equal(native.topk_mask(scores, 0.3, hint), reference_topk_mask(scores, 0.3)), step
        scores = scores + 0.02 * torch.randn(n, generator=torch.Generator().manual_seed(step + 1))


def test_kernel_takes_the_hint_route_when_the_hint_brackets_the_threshold():
    scores = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    thr, cut = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.int64)
    lib = native._library()

    def select(hint: torch.Tensor) -> int:
        return lib.popup_topk_select(scores.data_ptr(), scores.numel(), 60_000, hint.data_ptr(), 2,
                                     thr.data_ptr(), cut.data_ptr())

    hint = native.new_hint()
    assert select(hint) == 1  # no hint: histogram route, and a bracket for next time
    lo, hi = hint.tolist()
    assert lo < float(thr) < hi
    assert select(hint) == 0  # the bracket holds the threshold: one pass
    assert select(torch.tensor([10.0, 20.0], dtype=torch.float64)) == 1  # missed: exact anyway
    expected = reference_topk_mask(scores, 0.3)
    assert float(thr) == float(scores.abs()[expected].min()) and int(cut) == 199_999


@pytest.mark.parametrize("n", SIZES[:-1])  # 70_001 already splits across threads
def test_fused_selection_and_masked_weight_match_the_reference(n):
    """The eager training path (selection and masked weight in one kernel call, fp32 or sign-bit weights) against
    the reference, with no hint, the hint its first call leaves (the one-pass route) and wrong hints."""
    gen = torch.Generator().manual_seed(n + 1)
    weight, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    key, std = 0xC0FFEE + n, 0.0625
    signs, signed = native.sign_bits((n,), key), _draw((n,), "signed", std, key)
    for name, scores in _patterns(n).items():
        for k in _ks(n):
            ref_out, ref_grad = _reference_step(scores, weight, k, grad)
            ref_signed, ref_signed_grad = _reference_step(scores, signed, k, grad)
            hint = native.new_hint()
            wrongs = ([0.0, 1e-30], [1e6, 1e7], [2.0, 1.0], [0.0, math.inf]) if k in (0.1, 0.5) else ()
            for h in (hint, hint, *(torch.tensor(w, dtype=torch.float64) for w in wrongs)):
                s = scores.clone().requires_grad_()
                out, _ = native.masked_weight(s, weight, k, h)
                out.backward(grad)
                assert torch.equal(_bits_of(out), _bits_of(ref_out)), (name, k, h)
                assert torch.equal(_bits_of(s.grad), _bits_of(ref_grad)), (name, k, h)
                s = scores.clone().requires_grad_()
                out_signs, _ = native.masked_weight_signs(s, signs, std, k, h.clone())
                out_signs.backward(grad)
                assert torch.equal(_bits_of(out_signs), _bits_of(ref_signed)), (name, k, h)
                assert torch.equal(_bits_of(s.grad), _bits_of(ref_signed_grad)), (name, k, h)


def test_fused_kernel_takes_the_hint_route_when_the_hint_brackets_the_threshold():
    scores, weight = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(5))
    out = torch.empty_like(weight)
    thr, cut = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.int64)
    lib = native._library()

    def select(hint: torch.Tensor) -> int:
        return lib.popup_select_masked_weight(scores.data_ptr(), weight.data_ptr(), scores.numel(), 60_000,
                                              hint.data_ptr(), 2, out.data_ptr(), thr.data_ptr(), cut.data_ptr())

    expected = weight * reference_topk_mask(scores, 0.3)
    hint = native.new_hint()
    assert select(hint) == 1 and torch.equal(out, expected)  # no hint: histogram route, then a mask pass
    out.fill_(math.nan)
    assert select(hint) == 0 and torch.equal(out, expected)  # one pass writes every entry


@pytest.mark.parametrize("n", SIZES)
def test_fallback_gives_the_same_threshold_cut_and_mask(n, monkeypatch):
    for name, scores in _patterns(n).items():
        for k in _ks(n):
            thr, cut = native.topk_threshold(scores, k)
            with monkeypatch.context() as m:
                m.setattr(native, "_library", lambda: None)
                thr_t, cut_t = native.topk_threshold(scores, k)
                mask_t = native.topk_mask(scores, k)
            # the cut may differ where every tie is kept (the C kernels say n - 1): the pairs mean the same mask
            assert torch.equal(thr, thr_t), (name, k)
            assert torch.equal(native.torch_mask(scores, thr, cut), native.torch_mask(scores, thr_t, cut_t)), (name, k)
            assert torch.equal(mask_t, reference_topk_mask(scores, k)), (name, k)


def test_non_contiguous_scores_take_the_fallback_exactly():
    scores = torch.randn(300, 700, generator=torch.Generator().manual_seed(2)).t()
    assert not scores.is_contiguous()
    assert torch.equal(native.topk_mask(scores, 0.5), reference_topk_mask(scores, 0.5))


def _reference_step(scores, weight, k, grad):
    s = scores.detach().clone().requires_grad_()
    out = layers._StraightThrough.apply(s, weight, reference_topk_mask(s, k))
    out.backward(grad)
    return out.detach(), s.grad


@pytest.mark.parametrize("use_fallback", [False, True])
@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (7,), (513, 257)])
def test_masked_weight_and_backward_are_the_reference_bit_for_bit(shape, use_fallback, monkeypatch):
    if use_fallback:
        monkeypatch.setattr(native, "_library", lambda: None)
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(shape, generator=gen)
    scores.view(-1)[::5] = 0.0  # sign(0) = 0 in backward
    scores.view(-1)[1::7] = -0.0
    weight = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen)
    for k in (0.1, 0.5, 0.9):
        ref_out, ref_grad = _reference_step(scores, weight, k, grad)
        s = scores.clone().requires_grad_()
        out, thr = native.masked_weight(s, weight, k, native.new_hint())
        out.backward(grad)
        assert torch.equal(_bits_of(out), _bits_of(ref_out)), k  # dropped negative weights are -0.0 in both
        assert torch.equal(_bits_of(s.grad), _bits_of(ref_grad)), k
        assert torch.equal(_bits_of(native.ste_backward(grad, weight, scores)), _bits_of(ref_grad)), k
        kept = reference_topk_mask(scores, k)
        assert float(thr) == float(scores.abs()[kept].min())


@pytest.mark.parametrize("use_fallback", [False, True])
def test_signed_constant_from_sign_bits_matches_the_generated_weight(use_fallback, monkeypatch):
    if use_fallback:
        monkeypatch.setattr(native, "_library", lambda: None)
    shape, key, std = (33, 17, 3, 3), 987654321, 0.0731
    weight = _draw(shape, "signed", std, key)
    signs = native.sign_bits(shape, key)
    assert signs.numel() == math.ceil(weight.numel() / 8)
    gen = torch.Generator().manual_seed(4)
    scores, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ref_out, ref_grad = _reference_step(scores, weight, 0.5, grad)
    s = scores.clone().requires_grad_()
    out, _ = native.masked_weight_signs(s, signs, std, 0.5)
    out.backward(grad)
    assert torch.equal(_bits_of(out), _bits_of(ref_out))
    assert torch.equal(_bits_of(s.grad), _bits_of(ref_grad))


@pytest.mark.parametrize("use_fallback", [False, True])
def test_sign_bits_are_the_generator_sign_bits(use_fallback, monkeypatch):
    if use_fallback:
        monkeypatch.setattr(native, "_library", lambda: None)
    for n in (1, 8, 13, 100_003):
        key = 0xDEADBEEF12345678 + n
        expected = np.packbits((_bits(key, 0, n) >> np.uint64(63)).astype(np.uint8), bitorder="little")
        assert np.array_equal(native.sign_bits((n,), key).numpy(), expected)
        normal = _draw((n,), "normal", 1.0, key)  # the normal family takes its sign from the same bit
        assert np.array_equal(np.packbits((normal < 0).numpy(), bitorder="little"), expected)


@pytest.mark.parametrize("family", list(native.FAMILIES))
def test_generate_is_bit_identical_to_init(family):
    assert native.available()
    for key in (0, 1, 0x0123456789ABCDEF, 2**64 - 1):
        for shape, std in (((300_001,), 0.05), ((64, 3, 7, 7), 1.3), ((5,), 2.0e-3)):
            expected = _draw(shape, family, std, key)
            got = native.generate(shape, key, family, std)
            assert got.shape == expected.shape
            assert torch.equal(_bits_of(got), _bits_of(expected)), (family, key, shape)


@pytest.mark.parametrize("family", list(native.FAMILIES))
def test_generate_in_chunks_with_an_offset(family):
    lib, n, key = native._library(), 250_007, 42
    expected = _draw((n,), family, 0.3, key)
    out = torch.empty(n)
    for start in range(0, n, 65_536):  # callers may chunk a tensor (or spread chunks over workers)
        stop = min(n, start + 65_536)
        assert lib.popup_generate(key, start, stop - start, native.FAMILIES[family], 0.3,
                                  out[start:].data_ptr(), 2) == 0
    assert torch.equal(_bits_of(out), _bits_of(expected))


def test_disabled_by_environment_uses_the_fallback(monkeypatch, fresh_native):
    monkeypatch.setenv("TIMM_POPUP_NATIVE", "0")
    scores = torch.randn(70_001, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: no warning
        assert not native.available()
        assert torch.equal(native.topk_mask(scores, 0.5), reference_topk_mask(scores, 0.5))
        assert torch.equal(_bits_of(native.generate((1000,), 7, "normal", 1.0)),
                           _bits_of(_draw((1000,), "normal", 1.0, 7)))
    assert not fresh_native.exists()


def _failing_compiler(tmp_path, name: str, script: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("compiler", ["false", "broken"])
def test_failing_compiler_falls_back_and_leaves_no_temp_files(compiler, monkeypatch, fresh_native, tmp_path):
    if compiler == "broken":  # answers --version, then fails to compile after writing a partial output file
        compiler = _failing_compiler(tmp_path, "cc-broken",
                                     'if [ "$1" = --version ]; then echo broken 1.0; exit 0; fi\n'
                                     'for a; do prev=$out; out=$a; done\n'
                                     'echo junk > "$prev"; echo "error: no" >&2; exit 1\n')
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(UserWarning, match="pure-PyTorch"):
        assert not native.available()
    assert not native.available()  # decided once: no second attempt, no second warning
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(native.topk_mask(scores, 0.3), reference_topk_mask(scores, 0.3))
    leftovers = list(fresh_native.iterdir()) if fresh_native.exists() else []
    assert leftovers == []


def test_compiles_into_the_cache_atomically(fresh_native):
    assert native.available()
    files = os.listdir(fresh_native)
    assert len(files) == 1 and files[0].startswith("popup_kernels-") and files[0].endswith(".so")


class _NoSync:
    """Host syncs made through the Python tensor API raise (item, int, float, bool, index, tolist, nonzero)."""

    names = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "nonzero")

    def __init__(self, monkeypatch):
        def boom(*args, **kwargs):
            raise AssertionError("host sync in the sync-free path")

        for name in self.names:
            monkeypatch.setattr(torch.Tensor, name, boom)


def test_fallback_is_sync_free(fallback, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(64, 3, 3, 3, generator=gen)
    scores.view(-1)[:40] = 0.5  # ties at the threshold exercise the cut
    weight, grad = torch.randn(64, 3, 3, 3, generator=gen), torch.randn(64, 3, 3, 3, generator=gen)
    signs = native.sign_bits(weight.shape, 11)
    expected = reference_topk_mask(scores, 0.9)
    s = scores.clone().requires_grad_()
    with monkeypatch.context() as m:
        _NoSync(m)
        mask = native.topk_mask(scores, 0.9)
        out, _ = native.masked_weight(s, weight, 0.9)
        out.backward(grad)
        out_signs, _ = native.masked_weight_signs(s, signs, 0.1, 0.9)
    assert torch.equal(mask, expected)
    assert torch.equal(out, weight * expected)
    if torch.cuda.is_available():  # the real thing: CUDA's sync detector
        cuda = scores.cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            mask_cuda = native.topk_mask(cuda, 0.9)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(mask_cuda.cpu(), expected)


def test_fallback_has_no_data_dependent_ops():
    # On the meta device any data-dependent op (nonzero, item, boolean indexing) raises.
    scores = torch.empty(300_001, device="meta")
    thr, cut = native.torch_select(scores, 1234)
    mask = native.torch_mask(scores, thr, cut)
    assert mask.shape == scores.shape and thr.shape == () and cut.shape == ()


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(8)
    scores, weight = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen)
    thr, cut = native.topk_threshold(scores, 0.5)
    signs = native.sign_bits(scores.shape, 3)
    ops = torch.ops.timm_popup
    torch.library.opcheck(ops.topk_select, (scores, 600, native.new_hint()))
    torch.library.opcheck(ops.build_mask, (scores, thr, cut))
    torch.library.opcheck(ops.masked_weight, (scores.clone().requires_grad_(), weight, thr, cut))
    torch.library.opcheck(ops.masked_weight_signs, (scores.clone().requires_grad_(), signs, 0.2, thr, cut))
    torch.library.opcheck(ops.ste_backward, (weight, weight, scores))


@pytest.mark.parametrize("name,kwargs", [("popup_resnet18", {}), ("popup_vit_tiny_patch16_224", dict(img_size=32))])
@pytest.mark.parametrize("k", [0.1, 0.5, 0.9])
def test_fused_training_masks_equal_the_reference_on_every_tensor(name, kwargs, k):
    """What a training forward computes (selection + masked weight, with and without a carried hint) against the
    previous implementation, on every masked tensor of a real model."""
    import timm

    import timm_popup

    model = timm.create_model(name, k=k, **kwargs)
    for tensor_name, mask in timm_popup.popup_masks(model).items():
        expected = reference_topk_mask(mask.scores, k)
        hint = native.new_hint()
        for _ in range(2):  # the second call selects through the hint the first one left
            out = layers.fused_masked_weight(mask.scores, mask.weight, k, hint)
            assert torch.equal(out != 0, expected), tensor_name  # signed-constant weights are never 0
            assert torch.equal(out, mask.weight * expected), tensor_name
