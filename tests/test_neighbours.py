import numpy as np
import pytest

from plugins.face_nms.neighbours import nearest


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_pairs(n=20000, d=128, pairs=300, cos=0.86, seed=0):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)))
    a = rng.choice(n // 2, pairs, replace=False)
    b = a + n // 2
    noise = rng.standard_normal((pairs, d)).astype(np.float32)
    noise -= (noise * x[a]).sum(1, keepdims=True) * x[a]
    x[b] = cos * x[a] + np.sqrt(1 - cos ** 2) * unit(noise)
    return x, a, b


def test_exact_matches_brute_force():
    x = unit(np.random.default_rng(1).standard_normal((500, 32)))
    S, I, info = nearest(x, x, 5, method="exact")
    full = x @ x.T
    assert info["method"] == "exact"
    assert np.array_equal(I, np.argsort(-full, axis=1)[:, :5])
    assert np.allclose(S, np.sort(full, axis=1)[:, ::-1][:, :5], atol=1e-5)


@pytest.mark.parametrize("cos, floor", [(0.7, 0.95), (0.86, 0.99)])
def test_ivf_defaults_find_near_pairs_as_exact_does(cos, floor):
    x, a, b = planted_pairs(cos=cos)
    _, Ie, _ = nearest(x, x, 2, method="exact")
    _, Ii, info = nearest(x, x, 2, method="ivf")
    assert info["nprobe"] == info["nlist"] // 8
    exact = ((Ie[a] == b[:, None]).any(1) | (Ie[b] == a[:, None]).any(1)).mean()
    ivf = ((Ii[a] == b[:, None]).any(1) | (Ii[b] == a[:, None]).any(1)).mean()
    assert exact == 1.0
    assert ivf >= floor, ivf


def test_ivf_recall_grows_with_nprobe():
    x, a, b = planted_pairs(cos=0.6)
    recall = []
    for nprobe in (2, 16, 128):
        _, I, _ = nearest(x, x, 2, method="ivf", nlist=128, nprobe=nprobe)
        recall.append(((I[a] == b[:, None]).any(1) | (I[b] == a[:, None]).any(1)).mean())
    assert recall[0] < recall[1] <= recall[2] == 1.0


def test_timings_and_fewer_rows_than_k():
    x = unit(np.random.default_rng(2).standard_normal((3, 8)))
    S, I, info = nearest(x, x, 5)
    assert (I[:, 3:] == -1).all() and info["train_add_s"] >= 0 and info["search_s"] >= 0


@pytest.mark.parametrize("self_join", [True, False])
def test_blocked_ivf_finds_what_faiss_ivf_finds_with_the_same_probe_fraction(self_join):
    import faiss
    x, a, b = planted_pairs(n=30000, d=64, pairs=400, cos=0.8, seed=3)
    queries = x if self_join else x[a].copy()
    S, I, info = nearest(queries, x, 4, method="ivf", nlist=64, nprobe=16)
    assert info["engine"].startswith("blocked") and (info["nlist"], info["nprobe"]) == (64, 16)
    ref = faiss.IndexIVFFlat(faiss.IndexFlatIP(64), 64, 64, faiss.METRIC_INNER_PRODUCT)
    ref.train(x)
    ref.add(x)
    ref.nprobe = 16
    If = ref.search(queries, 4)[1]
    if self_join:
        found = ((I[a] == b[:, None]).any(1) | (I[b] == a[:, None]).any(1)).mean()
        found_f = ((If[a] == b[:, None]).any(1) | (If[b] == a[:, None]).any(1)).mean()
        assert (I[:, 0] == np.arange(len(x))).all()
    else:
        found, found_f = (I == b[:, None]).any(1).mean(), (If == b[:, None]).any(1).mean()
        assert (I[:, 0] == a).all()
    assert found_f >= 0.95 and found >= found_f - 0.02, (found, found_f)
    # every neighbour reported carries its float32 cosine, in descending order
    assert np.allclose(S, np.einsum("nd,nkd->nk", queries, x[I]), atol=1e-5)
    assert (np.diff(S, axis=1) <= 1e-6).all()


def test_large_exact_search_on_the_cpu_is_blocked_and_matches_faiss(monkeypatch):
    import plugins.face_nms.neighbours as nb
    x, a, b = planted_pairs(n=20000, d=64, pairs=200, cos=0.6, seed=5)
    q = x[:3000].copy()
    S_flat, I_flat, info_flat = nearest(q, x, 5, method="exact")
    monkeypatch.setattr(nb, "EXACT_PAIRS", 1000)
    S, I, info = nearest(q, x, 5, method="exact")
    assert info_flat["engine"] == "faiss IndexFlatIP" and info["engine"] == "blocked bfloat16 products"
    # bfloat16 only picks candidates: the neighbours and their float32 cosines are the flat index's
    assert (I == I_flat).mean() > 0.999 and np.abs(S - S_flat).max() < 1e-5
    assert (I[:, 0] == np.arange(3000)).all()
