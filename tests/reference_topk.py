"""The selection timm-popup used before the fused kernels (sampled bracket + kthvalue, with host syncs): the
reference the fused path must reproduce bit for bit. Kept verbatim, test-only."""

import math

import torch

_SAMPLE = 4096  # scores sampled to bracket the threshold; the bracket holds ~4% of a layer
_SMALL = 1 << 16  # below this many weights a plain kthvalue is as fast


def num_kept(n: int, k: float) -> int:
    """Number of weights a layer of ``n`` keeps at fraction ``k`` (Python's ``round``)."""
    return round(k * n)


def _kth_largest(a: torch.Tensor, keep: int) -> tuple[torch.Tensor, int]:
    """Exact value of the ``keep``-th largest element of 1-D ``a``, and how many elements are >= it.

    A strided sample brackets the value; one pass counts what lies above the bracket and gathers the
    thin band inside it, and ``kthvalue`` runs on the band only. Falls back to a full ``kthvalue`` if
    the bracket missed (the result is exact either way, and deterministic).
    """
    n = a.numel()
    if n > _SMALL:
        sample = a[:: n // _SAMPLE].sort().values
        m = sample.numel()
        q = (n - keep) / n
        margin = 4.0 * math.sqrt(m * q * (1 - q)) + 8
        j_lo, j_hi = int(q * m - margin), int(q * m + margin)
        inside = a >= sample[j_lo] if j_lo >= 0 else torch.ones_like(a, dtype=torch.bool)
        n_above = 0
        if j_hi < m:
            above = a > sample[j_hi]
            inside &= ~above
            n_above = int(torch.count_nonzero(above))
        band = a[inside]
        need = keep - n_above  # how many of the band are kept
        if 0 < need <= band.numel():
            threshold = band.kthvalue(band.numel() - need + 1).values
            return threshold, n_above + int(torch.count_nonzero(band >= threshold))
    threshold = a.kthvalue(n - keep + 1).values
    return threshold, int(torch.count_nonzero(a >= threshold))


def reference_topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean mask of the ``round(k * n)`` largest ``|scores|``; ties broken by lowest flat index."""
    a = scores.detach().abs().flatten()
    n = a.numel()
    keep = round(k * n)
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold, n_ge = _kth_largest(a, keep)
    mask = a >= threshold
    if n_ge > keep:  # ties at the threshold: drop the tied entries with the highest indices
        tied = (a == threshold).nonzero().flatten()
        mask[tied[tied.numel() - (n_ge - keep):]] = False
    return mask.view_as(scores)
