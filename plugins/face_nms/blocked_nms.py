"""Greedy NMS of one identity too large for its m x m cosines, in blocks of ranked faces.

Face j (rank position j) is kept at threshold t iff no face kept at t ranked before it has a
cosine above t, so once positions < s are decided, a block of positions s..s+b-1 needs only
its cosines to the faces kept so far and its own b x b cosines. The faces kept so far at any
of the thresholds (the kept sets of different thresholds are not nested; their union, at most
m faces) are compared with the block ``c`` at a time: each comparison gives, per block face,
the thresholds at which an earlier kept face suppresses it (bit l of a mask for thresholds[l],
as :func:`.nms.greedy_nms`); greedy NMS within the block, one position at a time from those
masks, finishes the block. The working arrays are b x c cosines and masks, with b = c = the
square root of the pair budget: memory O(m d + b c), independent of m^2; each pair of faces
is multiplied once (half of the symmetric m x m product).

Every product has both operands at least ``MIN_ROWS`` rows high (short blocks are padded with
zero rows): the CPU's BLAS takes another kernel for narrower products whose float32 rounding
differs from the whole matrix product's, which would move decisions at a cosine one rounding
step from a threshold.
"""
import math

import numpy as np
import torch

from .nms import _FULL, exceeded, float32_floor, greedy_nms, over_masks

MIN_ROWS = 16


def block_shape(budget):
    """(b, c): ranked faces per block, kept faces per comparison, for ``budget`` cosines at once."""
    b = max(MIN_ROWS, math.isqrt(int(budget)))
    return b, max(MIN_ROWS, int(budget) // b)


def _padded(X, s, e):
    """Rows s..e-1 of X, followed by zero rows up to MIN_ROWS."""
    if e - s >= MIN_ROWS:
        return X[s:e]
    return torch.cat([X[s:e], X.new_zeros((MIN_ROWS - (e - s), X.shape[1]))])


def _or_rows(a):
    """Bitwise OR of each row of an int64 matrix."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.bitwise_or.reduce(a.numpy(), axis=1))
    while a.shape[1] > 1:
        h = a.shape[1] // 2
        top = a[:, :h] | a[:, h:2 * h]
        if a.shape[1] % 2:
            top[:, 0] |= a[:, -1]
        a = top
    return a[:, 0]


def _suppressed(P, floors, masks):
    """Per row of cosines P (block x kept faces, numpy): the OR of each kept face's mask and the
    thresholds its cosine exceeds. Only cosines above the lowest threshold are looked at: most
    pairs of an identity lie below the thresholds a selection uses."""
    rows, cols = np.nonzero(P > floors[0])
    out = np.zeros(len(P), np.int64)
    if len(rows):
        hit = exceeded(np.minimum(P[rows, cols], np.float32(1.0)), floors) & masks[cols]
        starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
        out[rows[starts]] = np.bitwise_or.reduceat(hit, starts)
    return torch.from_numpy(out)


def _chunks(n, c):
    """(start, end) column ranges of n kept faces, c at a time, each at least MIN_ROWS wide
    (the last one reaches back over the one before; before MIN_ROWS faces are kept, the padding
    rows of the buffer fill it)."""
    for s in range(0, n, c):
        e = min(s + c, n)
        yield (max(0, e - MIN_ROWS), max(e, MIN_ROWS)) if e - s < MIN_ROWS else (s, e)


def greedy_blocks(X, thresholds, budget):
    """(kept masks (m,) int64, bit l for thresholds[l]; most cosines held at once) of greedy NMS
    over ranked float32 features ``X`` (m x d, rows normalised), ``budget`` cosines at a time."""
    k = len(thresholds)
    full = int(_FULL[k])
    m, d = X.shape
    b, c = block_shape(budget)
    floors = np.array([float32_floor(t) for t in thresholds], np.float32)
    kept = X.new_zeros((m + MIN_ROWS, d))  # the faces kept at any threshold, in rank order
    kept_masks = torch.zeros(m + MIN_ROWS, dtype=torch.int64, device=X.device)
    n_kept = 0
    keep = torch.zeros(m, dtype=torch.int64, device=X.device)
    peak = 0
    for s in range(0, m, b):
        e = min(s + b, m)
        block = _padded(X, s, e)
        sup = torch.zeros(e - s, dtype=torch.int64, device=X.device)
        for u0, u1 in _chunks(n_kept, c):
            # clamped to [-1, 1] as the whole matrix is, but only where a value is used
            P = block @ kept[u0:u1].T
            peak = max(peak, P.numel())
            if k == 1:  # every kept face has mask 1: suppressed iff the nearest kept face is above
                near = P[:e - s, :min(u1, n_kept) - u0].max(dim=1).values.clamp_(max=1.0)
                sup |= (near > floors[0]).to(torch.int64)
            elif X.device.type == "cpu":
                sup |= _suppressed(P[:e - s].numpy(), floors, kept_masks[u0:u1].numpy())
            else:
                sup |= _or_rows(over_masks(P[:e - s].clamp_(-1.0, 1.0), thresholds) & kept_masks[u0:u1][None, :])
            del P
        Q = (block @ block.T).clamp_(-1.0, 1.0)
        peak = max(peak, Q.numel())
        ov = over_masks(Q[None, :e - s, :e - s], thresholds)
        del Q
        block_keep = greedy_nms(ov, k, sup[None])[0]
        keep[s:e] = block_keep
        new = torch.nonzero(block_keep).ravel()
        kept[n_kept:n_kept + len(new)] = X[s:e][new]
        kept_masks[n_kept:n_kept + len(new)] = block_keep[new]
        n_kept += len(new)
    return keep & full, peak


def nearest_blocks(K, budget):
    """(max cosine of each row of ``K`` to another row, -inf when alone; most cosines held at
    once): the nearest-kept-face cosines of one identity's kept faces ``K`` (float32, normalised)."""
    n = len(K)
    b, c = block_shape(budget)
    padded = torch.cat([K, K.new_zeros((MIN_ROWS, K.shape[1]))])
    near = torch.full((n,), float("-inf"), dtype=K.dtype, device=K.device)
    peak = 0
    for s in range(0, n, b):
        e = min(s + b, n)
        block = _padded(K, s, e)
        for u0, u1 in _chunks(n, c):
            P = (block @ padded[u0:u1].T).clamp_(-1.0, 1.0)
            peak = max(peak, P.numel())
            P = P[:e - s]
            P[:, max(n, u0) - u0:] = float("-inf")  # padding rows
            lo, hi = max(s, u0), min(e, u1, n)
            if lo < hi:
                diag = torch.arange(lo, hi, device=K.device)
                P[diag - s, diag - u0] = float("-inf")
            near[s:e] = torch.maximum(near[s:e], P.max(dim=1).values)
    return near, peak
