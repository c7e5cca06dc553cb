"""Identities larger than the pair budget: decided in blocks of ranked faces, same selection."""
import numpy as np
import pytest
import torch

from plugins.face_nms.blocked_nms import block_shape, greedy_blocks, nearest_blocks
from plugins.face_nms.nms import float32_floor, greedy_nms, nearest_kept, over_masks
from plugins.face_nms.select import select_core_set

SMALL = 4096  # pair budget of the tests: blocks of 64 ranked faces against 64 kept faces at a time


def large_identity(m, d=32, seed=0, small_ids=40):
    """One identity of ``m`` faces (near-duplicate sessions, as crawled sets have) plus small ones."""
    rng = np.random.default_rng(seed)
    sizes = np.concatenate([[m], rng.integers(2, 30, small_ids)])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    feats = rng.standard_normal((len(sizes), d))[labels] + 0.9 * rng.standard_normal((len(labels), d))
    session = rng.random(len(labels)) < 0.4
    for i in np.flatnonzero(session)[1:]:
        if labels[i - 1] == labels[i]:
            feats[i] = feats[i - 1] + 0.15 * rng.standard_normal(d)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))
    return feats[perm].astype(np.float16), labels[perm]


def ranked_features(feats, order="hard-first"):
    """One identity's rows normalised in float64 then rounded to float32, in the selection's rank order."""
    X = feats.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    c = X.sum(0)
    c /= np.linalg.norm(c)
    score = np.round(X @ c * 2.0 ** 20) * (1 if order == "hard-first" else -1)
    rank = np.lexsort((np.arange(len(X)), score))
    return torch.from_numpy(X[rank].astype(np.float32)), rank


def full_cosines(X):
    """The whole m x m float32 product, as the unblocked selection computes it."""
    return torch.bmm(X[None], X[None].transpose(1, 2))[0].clamp_(-1.0, 1.0)


def plain_greedy(S, t):
    """Greedy NMS in rank order, one face at a time: the kept positions at threshold t."""
    S = S.numpy()
    kept = []
    for j in range(len(S)):
        if not kept or not (S[kept, j] > t).any():
            kept.append(j)
    return np.array(kept)


def brute_force(feats, labels, t, order="hard-first"):
    """Kept rows of plain per-identity greedy NMS on float32 products of float64-normalised rows."""
    keep = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        X, rank = ranked_features(feats[rows], order)
        keep.extend(rows[rank[plain_greedy(full_cosines(X), t)]])
    return np.sort(np.array(keep, np.int64))


def test_block_shape_follows_the_budget():
    assert block_shape(SMALL) == (64, 64)
    assert block_shape(1 << 22) == (2048, 2048)
    assert block_shape(10) == (16, 16)  # products are never narrower than 16 rows


@pytest.mark.parametrize("m", [1, 5, 64, 1000, 1037])
def test_blocks_give_every_threshold_the_whole_matrix_selection(m):
    rng = np.random.default_rng(m)
    feats, _ = large_identity(m, small_ids=0, seed=m)
    X, _ = ranked_features(feats)
    ts = np.sort(rng.uniform(0.0, 0.9, 64))
    S = full_cosines(X)
    want = greedy_nms(over_masks(S[None], ts), len(ts))[0]
    keep, peak = greedy_blocks(X, ts, SMALL)
    assert torch.equal(keep, want)
    assert peak <= SMALL
    for bit in (0, 21, 40, 63):
        assert np.array_equal(np.flatnonzero((keep >> bit) & 1), plain_greedy(S, ts[bit]))
    one, _ = greedy_blocks(X, ts[40:41], SMALL)
    assert torch.equal(one, (want >> 40) & 1)
    if m >= 1000:
        # the thresholds do not keep nested sets: the union of kept faces is what blocks compare with
        sets = [set(np.flatnonzero((keep >> b) & 1).tolist()) for b in range(64)]
        assert any(not sets[b] <= sets[b + 1] for b in range(63))


def test_nearest_kept_cosine_in_blocks_equals_whole_matrix():
    feats, _ = large_identity(1500, small_ids=0, seed=3)
    X, _ = ranked_features(feats)
    S = full_cosines(X)
    keep = greedy_nms(over_masks(S[None], [0.55]), 1)[0].bool()
    want = nearest_kept(S[None], keep[None])[0][keep]
    got, peak = nearest_blocks(X[keep], SMALL)
    assert torch.equal(got, want) and peak <= SMALL
    assert float(got.max()) <= float32_floor(0.55)


def test_large_identity_threshold_mode_equals_brute_force():
    feats, labels = large_identity(3000, seed=1)
    for t in (0.7, 0.8):
        sel = select_core_set(feats, labels, threshold=t, pair_budget=SMALL, chunk_rows=500)
        assert sel.pair_peak <= SMALL
        assert np.array_equal(sel.keep, brute_force(feats, labels, t))
        whole = select_core_set(feats, labels, threshold=t, pair_budget=1 << 24)
        assert whole.pair_peak == 3000 * 3000  # the whole matrix: what blocks replace
        assert np.array_equal(sel.keep, whole.keep)
        assert 0.1 < np.mean(labels[sel.keep] == 0) * len(sel.keep) / 3000 < 0.9


@pytest.mark.parametrize("search_sample", [0, 20000])
def test_large_identity_ratio_mode_equals_whole_matrix(search_sample):
    # search_sample 0: the large identity is decided while streaming; 20000: it is in the sample,
    # whose blocked features are kept and decided again for each grid
    feats, labels = large_identity(2500, seed=2, small_ids=300)
    kw = dict(ratio=0.5, search_sample=search_sample, chunk_rows=700)
    sel = select_core_set(feats, labels, pair_budget=SMALL, **kw)
    whole = select_core_set(feats, labels, pair_budget=1 << 24, **kw)
    assert sel.pair_peak <= SMALL and whole.pair_peak == 2500 * 2500
    assert sel.search == whole.search  # every threshold tried kept exactly as many faces
    assert sel.threshold == whole.threshold and np.array_equal(sel.keep, whole.keep)
    assert np.array_equal(sel.keep, brute_force(feats, labels, sel.threshold))
    assert abs(sel.fraction - 0.5) <= 0.005
    assert np.array_equal(sel.nn_rows, whole.nn_rows) and np.array_equal(sel.nn_cos, whole.nn_cos, equal_nan=True)


def test_threshold_masks_by_table_equal_a_binary_search_per_cosine():
    from plugins.face_nms.nms import _FULL
    rng = np.random.default_rng(5)
    for ts in (np.sort(rng.uniform(-0.9, 0.95, 64)), np.linspace(0.5, 0.5 + 1e-6, 64)[::3], np.array([0.1, 0.2])):
        floors = torch.tensor([float32_floor(t) for t in ts], dtype=torch.float32)
        # cosines on, just above and just below every threshold, among uniform ones
        edge = torch.cat([floors, torch.nextafter(floors, torch.tensor(2.0)), torch.nextafter(floors, torch.tensor(-2.0)),
                          torch.tensor([-1.0, 1.0, 0.0])])
        S = torch.cat([torch.from_numpy(rng.uniform(-1, 1, 300_000).astype(np.float32)), edge]).reshape(1, -1, 1)
        S = S.expand(1, -1, 2).contiguous()
        want = torch.from_numpy(_FULL)[torch.searchsorted(floors, S.contiguous())]
        assert torch.equal(over_masks(S, ts), want)
        assert torch.equal(over_masks(S[:, :5], ts), want[:, :5])


@pytest.mark.parametrize("bad", [0, 255, -1, 1.5, True, "4096"])
def test_bad_pair_budget_is_refused_in_one_line(bad):
    feats, labels = large_identity(100, small_ids=3)
    with pytest.raises(ValueError, match=r"pair_budget must be a whole number of cosines >= 256, got"):
        select_core_set(feats, labels, threshold=0.5, pair_budget=bad)
