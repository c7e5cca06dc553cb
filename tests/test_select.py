import os
import numpy as np
import pytest

from plugins.face_nms.proxy_subset import per_identity_quota, random_subset
from plugins.face_nms.select import global_only, random_baseline, select_core_set


def clustered_features(n_ids=60, d=32, seed=0, max_size=40, dup_bursts=True):
    """Identities of varied size; some faces are near-duplicates of another face of the identity."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(1.6, n_ids), max_size)
    sizes[:3] = [1, 2, max_size]
    labels = np.repeat(np.arange(n_ids), sizes)
    centers = rng.standard_normal((n_ids, d))
    feats = centers[labels] + 0.9 * rng.standard_normal((len(labels), d))
    if dup_bursts:
        src = rng.random(len(labels)) < 0.3
        for i in np.flatnonzero(src)[1:]:
            if labels[i - 1] == labels[i]:
                feats[i] = feats[i - 1] + 0.05 * rng.standard_normal(d)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float16), labels


def shuffle(feats, labels, seed=1):
    perm = np.random.default_rng(seed).permutation(len(labels))
    return feats[perm], labels[perm], perm


def brute_force(feats, labels, threshold, order="hard-first", centers=None):
    """Plain per-identity greedy NMS in float64, for comparison."""
    X = feats.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    keep = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        c = X[rows].mean(0) if centers is None else centers[lab].astype(np.float64)
        c /= np.linalg.norm(c)
        score = np.round(X[rows] @ c * 2.0 ** 20)  # the selection's tie grid
        sign = 1 if order == "hard-first" else -1
        ranked = sorted(range(len(rows)), key=lambda i: (sign * score[i], rows[i]))
        kept = []
        for i in ranked:
            if all(X[rows[i]] @ X[rows[j]] <= threshold for j in kept):
                kept.append(i)
        keep.extend(rows[i] for i in kept)
    return np.array(sorted(keep))


def safe_threshold(feats, labels, near, margin=1e-5):
    """A threshold close to `near` with no same-identity cosine within `margin` of it."""
    X = feats.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    cos = np.concatenate([(X[labels == k] @ X[labels == k].T).ravel() for k in np.unique(labels)])
    for t in near + np.linspace(0, 0.05, 501):
        if np.min(np.abs(cos - t)) > margin:
            return float(t)
    raise AssertionError("no safe threshold")


def check_invariants(feats, labels, sel, order="hard-first"):
    X = feats.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    keep = set(sel.keep.tolist())
    t = sel.threshold
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        kept = [r for r in rows if r in keep]
        if len(rows) == 1:
            assert kept == [rows[0]]
        assert kept, "an identity always keeps a face"
        K = X[kept]
        cos = K @ K.T - 2 * np.eye(len(kept))
        assert cos.max() <= t + 1e-4
        c = X[rows].mean(0)
        c /= np.linalg.norm(c)
        score = {r: X[r] @ c for r in rows}
        for r in rows:
            if r in keep:
                continue
            # ranked before r, up to float rounding of the scores
            before = [k for k in kept if score[k] < score[r] + 1e-5] if order == "hard-first" else kept
            assert max(X[r] @ X[k] for k in before) > t - 1e-4, f"row {r} dropped without a suppressor"


@pytest.mark.parametrize("order", ["hard-first", "easy-first"])
@pytest.mark.parametrize("near", [0.2, 0.6, 0.9])
def test_equals_brute_force_on_random_data(order, near):
    feats, labels = clustered_features(seed=3)
    t = safe_threshold(feats, labels, near)
    got = select_core_set(feats, labels, threshold=t, order=order, chunk_rows=100)
    want = brute_force(feats, labels, t, order)
    assert np.array_equal(got.keep, want)
    assert 0 < got.kept < len(labels)


def test_centers_argument_changes_ranking_like_brute_force():
    feats, labels = clustered_features(seed=5)
    centers = np.random.default_rng(9).standard_normal((labels.max() + 1, feats.shape[1])).astype(np.float32)
    t = safe_threshold(feats, labels, 0.5)
    got = select_core_set(feats, labels, threshold=t, centers=centers)
    assert np.array_equal(got.keep, brute_force(feats, labels, t, centers=centers))
    assert not np.array_equal(got.keep, select_core_set(feats, labels, threshold=t).keep)


def test_invariants_and_determinism_on_shuffled_memmap(tmp_path):
    feats, labels = clustered_features(n_ids=120, seed=7)
    sf, sl, perm = shuffle(feats, labels)
    mm = np.lib.format.open_memmap(tmp_path / "features.npy", mode="w+", dtype=np.float16, shape=sf.shape)
    mm[:] = sf
    mm.flush()
    mm = np.load(tmp_path / "features.npy", mmap_mode="r")
    t = safe_threshold(feats, labels, 0.7)
    # budgets of a few hundred rows: several buckets, several blocks per bucket
    budget = 300 * sf.shape[1] * 2
    a = select_core_set(mm, sl, threshold=t, chunk_rows=64, source="spill", spill_dir=str(tmp_path),
                        memory_budget=budget)
    assert a.source == "spill"
    b = select_core_set(mm, sl, threshold=t, chunk_rows=1000, source="memory")
    c = select_core_set(mm, sl, threshold=t, chunk_rows=64, source="passes", memory_budget=budget)
    assert np.array_equal(a.keep, b.keep) and np.array_equal(a.keep, c.keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"], "temporary file left behind"
    check_invariants(sf, sl, a)
    assert np.array_equal(a.keep, brute_force(sf, sl, t))
    assert np.array_equal(a.keep, select_core_set(sf, sl, threshold=t).keep)  # in memory, no regrouping
    # nearest kept-neighbour cosine never exceeds the threshold
    finite = a.nn_cos[np.isfinite(a.nn_cos)]
    assert len(finite) and finite.max() <= t + 1e-4


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.85])
def test_ratio_is_reached_and_threshold_reproduces_it(ratio):
    feats, labels = clustered_features(n_ids=400, seed=11)
    sel = select_core_set(feats, labels, ratio=ratio)
    assert abs(sel.fraction - ratio) <= 0.005
    again = select_core_set(feats, labels, threshold=sel.threshold)
    assert np.array_equal(again.keep, sel.keep)
    check_invariants(feats, labels, sel)


def test_ratio_search_through_an_identity_sample():
    feats, labels = clustered_features(n_ids=400, seed=12)
    sel = select_core_set(feats, labels, ratio=0.6, search_sample=30)
    assert abs(sel.fraction - 0.6) <= 0.005
    assert np.array_equal(select_core_set(feats, labels, threshold=sel.threshold).keep, sel.keep)
    full = select_core_set(feats, labels, ratio=0.6, search_sample=10 ** 9)
    assert abs(full.fraction - 0.6) <= 0.005


def test_unreachable_ratio_gives_closest_achievable():
    feats, labels = clustered_features(n_ids=50, seed=2)
    floor = len(np.unique(labels)) / len(labels)  # one face per identity is the least NMS keeps
    sel = select_core_set(feats, labels, ratio=floor / 2)
    assert sel.fraction == pytest.approx(floor, abs=0.005)


def test_random_order_local_only_and_baselines():
    feats, labels = clustered_features(n_ids=200, seed=4)
    local = select_core_set(feats, labels, ratio=0.6, order="random", seed=1)
    assert abs(local.fraction - 0.6) <= 0.005
    assert np.array_equal(local.keep, select_core_set(feats, labels, ratio=0.6, order="random", seed=1).keep)
    rnd = random_baseline(labels, ratio=0.6, seed=0)
    glb = global_only(feats, labels, ratio=0.6)
    quota = per_identity_quota(np.bincount(labels), 0.6)
    for sel in (rnd, glb):
        assert np.array_equal(np.bincount(labels[sel.keep], minlength=len(quota)), quota)
    # global-only keeps the hardest faces: lowest cosine to the center within each identity
    X = feats.astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for lab in np.unique(labels)[:30]:
        rows = np.flatnonzero(labels == lab)
        c = X[rows].mean(0)
        score = np.round(X[rows] @ (c / np.linalg.norm(c)) * 2.0 ** 20)
        hardest = rows[np.lexsort((rows, score))][:quota[lab]]
        assert set(hardest) == set(glb.keep[labels[glb.keep] == lab])


def test_quota_and_random_subset():
    sizes = np.array([1, 2, 3, 10, 50, 0])
    q = per_identity_quota(sizes, 0.5)
    assert q.tolist()[0] == 1 and q[-1] == 0 and np.all(q <= sizes)
    assert q.sum() == round(0.5 * sizes.sum())
    labels = np.repeat(np.arange(len(sizes)), sizes)
    a, b = random_subset(labels, 0.5, seed=3), random_subset(labels, 0.5, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, random_subset(labels, 0.5, seed=4))
    assert np.array_equal(np.bincount(labels[a], minlength=len(sizes)), q)


@pytest.mark.parametrize("bad, match", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(), "exactly one"),
    (dict(threshold=0.5, ratio=0.5), "exactly one"), (dict(threshold=float("nan")), "finite"),
    (dict(threshold=0.5, order="sideways"), "order"),
])
def test_bad_arguments(bad, match):
    feats, labels = clustered_features(n_ids=5)
    with pytest.raises(ValueError, match=match):
        select_core_set(feats, labels, **bad)


def test_bad_inputs():
    feats, labels = clustered_features(n_ids=5)
    with pytest.raises(ValueError, match="one entry per feature"):
        select_core_set(feats, labels[:-1], threshold=0.5)
    with pytest.raises(ValueError, match="empty"):
        select_core_set(feats[:0], labels[:0], threshold=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        select_core_set(feats, labels - 1, threshold=0.5)
    with pytest.raises(ValueError, match="centers"):
        select_core_set(feats, labels, threshold=0.5, centers=np.zeros((1, 3)))


def test_threshold_grid_equals_one_threshold_at_a_time():
    import torch
    from plugins.face_nms.nms import greedy_nms, over_masks
    rng = np.random.default_rng(0)
    for m in (2, 7, 40):
        X = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((30, m, 8)).astype(np.float32)), dim=2)
        S = torch.bmm(X, X.transpose(1, 2))
        ts = np.sort(rng.uniform(-0.5, 0.9, 64))
        grid = greedy_nms(over_masks(S, ts), len(ts))
        for bit, t in enumerate(ts):
            one = greedy_nms(over_masks(S, [t]), 1)
            assert torch.equal((grid >> bit) & 1, one)
            # plain greedy NMS, identity by identity
            for b in range(len(S)):
                kept = []
                for i in range(m):
                    if all(S[b, j, i] <= np.float32(t) for j in kept):
                        kept.append(i)
                assert one[b].nonzero().ravel().tolist() == kept
        assert not torch.equal(grid & 1, (grid >> 63) & 1)


@pytest.mark.parametrize("order", ["hard-first", "easy-first"])
def test_two_face_identities_rank_by_row_on_any_device(order):
    # both faces of a two-face identity are equally far from their mean: the tie must go to the
    # lower row whatever the rounding of the device's arithmetic
    rng = np.random.default_rng(4)
    n = 3000
    a = rng.standard_normal((n, 64))
    feats = np.empty((2 * n, 64))
    feats[0::2] = a
    feats[1::2] = a + 0.3 * rng.standard_normal((n, 64))
    feats = (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float16)
    labels = np.repeat(np.arange(n), 2)
    sel = select_core_set(feats, labels, threshold=0.5, order=order)
    assert np.array_equal(sel.keep, np.arange(0, 2 * n, 2))


def _memmap(tmp_path, feats):
    mm = np.lib.format.open_memmap(tmp_path / "features.npy", mode="w+", dtype=np.float16, shape=feats.shape)
    mm[:] = feats
    mm.flush()
    return np.load(tmp_path / "features.npy", mmap_mode="r")


@pytest.mark.parametrize("source", ["spill", "passes"])
def test_ratio_search_reads_the_file_as_often_as_one_threshold(tmp_path, source):
    feats, labels = clustered_features(n_ids=400, seed=13)
    sf, sl, _ = shuffle(feats, labels)
    mm = _memmap(tmp_path, sf)
    budget = 800 * sf.shape[1] * 2  # a few buckets
    kw = dict(source=source, spill_dir=str(tmp_path), memory_budget=budget, chunk_rows=100, search_sample=40)
    sel = select_core_set(mm, sl, ratio=0.6, **kw)
    assert abs(sel.fraction - 0.6) <= 0.005 and sel.passes == 1
    fixed = select_core_set(mm, sl, threshold=sel.threshold, **kw)
    assert np.array_equal(fixed.keep, sel.keep)
    assert sel.file_reads == fixed.file_reads == (1 if source == "spill" else fixed.file_reads)
    assert np.array_equal(select_core_set(sf, sl, ratio=0.6, search_sample=40).keep, sel.keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]


def test_killed_out_of_core_selection_leaves_no_temporary_file(tmp_path):
    import subprocess
    import sys
    import textwrap
    feats, labels = clustered_features(n_ids=200, seed=14)
    sf, sl, _ = shuffle(feats, labels)
    _memmap(tmp_path, sf)
    np.save(tmp_path.parent / "labels_kill.npy", sl)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {root!r})
        import numpy as np
        from plugins.face_nms import feature_stream
        real = feature_stream.FeatureReader._bucket_blocks
        def killed(self, *a):
            # every bucket file is written: die before reading them back
            assert len(os.listdir({str(tmp_path)!r})) == 1, "temporary files must be unlinked"
            os.kill(os.getpid(), signal.SIGKILL)
        feature_stream.FeatureReader._bucket_blocks = killed
        from plugins.face_nms.select import select_core_set
        mm = np.load({str(tmp_path / "features.npy")!r}, mmap_mode="r")
        select_core_set(mm, np.load({str(tmp_path.parent / "labels_kill.npy")!r}), threshold=0.5, source="spill",
                        spill_dir={str(tmp_path)!r}, memory_budget=300 * 64)
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == -9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npy"]


def test_zero_rows_and_bad_arguments_are_refused():
    feats, labels = clustered_features(n_ids=20, seed=15)
    zero = feats.copy()
    zero[np.flatnonzero(labels == labels[-1])[0]] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        select_core_set(zero, labels, threshold=0.5)
    with pytest.raises(ValueError, match="d >= 1"):
        select_core_set(feats[:, :0], labels, threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        select_core_set(feats, labels, threshold=True)
    with pytest.raises(ValueError, match="search_sample"):
        select_core_set(feats, labels, ratio=0.5, search_sample=-1)


def test_unwritable_spill_folder_falls_back_to_passes(tmp_path):
    feats, labels = clustered_features(n_ids=60, seed=16)
    sf, sl, _ = shuffle(feats, labels)
    mm = _memmap(tmp_path, sf)
    notes = []
    sel = select_core_set(mm, sl, threshold=0.6, source="spill", spill_dir=str(tmp_path / "missing"), log=notes.append)
    assert sel.source == "passes" and "not a writable folder" in notes[0]
    assert np.array_equal(sel.keep, select_core_set(sf, sl, threshold=0.6).keep)


# ---- degenerate requests say so ----

def test_unreachable_ratio_and_a_selection_keeping_everything_warn():
    feats, labels = clustered_features(n_ids=50, seed=2)
    floor = len(np.unique(labels)) / len(labels)
    sel = select_core_set(feats, labels, ratio=floor / 2)
    assert len(sel.warnings) == 1, sel.warnings
    w = sel.warnings[0]
    assert w.startswith(f"ratio {floor / 2:g} is out of reach: the least a selection keeps is {floor:.2%}"), w
    assert "one face of each identity" in w and "--ratio" in w, w
    assert select_core_set(feats, labels, ratio=0.6).warnings == []
    sel = select_core_set(feats, labels, threshold=1.0)
    assert sel.kept == sel.total and len(sel.warnings) == 1
    assert sel.warnings[0].startswith("the selection keeps every face"), sel.warnings
    assert "lower --threshold" in sel.warnings[0], sel.warnings
    assert select_core_set(feats, labels, ratio=1.0).warnings == []  # asked for


def test_one_face_identities_only_warn_that_nothing_can_be_suppressed():
    feats, _ = clustered_features(n_ids=50, seed=2)
    labels = np.arange(len(feats))
    sel = select_core_set(feats, labels, ratio=0.6)
    assert sel.kept == sel.total
    assert len(sel.warnings) == 1 and sel.warnings[0].startswith(
        f"every identity has one face ({len(labels)} identities): NMS has nothing to suppress"), sel.warnings
