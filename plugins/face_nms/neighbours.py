"""k nearest neighbours by cosine between sets of unit vectors (identity centers, faces).

On the CPU faiss: an exact flat index while queries x base is small, else an inverted-file
index (IVF: k-means cells, ``nprobe`` cells searched per query), which at millions of centers
is the difference between hours and minutes. On a CUDA device, exact search by blocked
matrix products in torch (fp16 products, the candidates re-scored in float32).

IVF defaults: nlist = 2^round(log2(sqrt(n))) cells (16 .. 16384), trained on 64 nlist rows
(faiss warns below 39), nprobe = nlist / 8. Identity centers of a trained model spread nearly
uniformly on the sphere, where cells follow no cluster structure and recall depends on the
probed fraction nprobe / nlist more than on nlist. On 200k and 500k random 512-d unit vectors
with 2,000 planted pairs, nlist 512 .. 2048, a pair counted as found from either of its rows (as
``conflicts`` does), that fraction gave (recall; ranges over the runs):

    nprobe/nlist   cos 0.5     cos 0.6     cos 0.7     cos 0.86   search cost (of exact)
    1/64           0.46-0.49   0.57-0.60   0.76        0.95       1/64
    1/16           0.72-0.88   0.87-0.96   0.92-0.99   0.99-1.0   1/16
    1/8            0.91-0.95   0.955-0.99  0.99-1.0    1.0        1/8
    1/4            0.995       0.991       1.0         1.0        1/4

1/8 finds 99% of pairs at cosine 0.7 and all at 0.86; pairs near 0.5 need a larger fraction
(``nprobe``) or the exact search (``method="exact"``, or a GPU). A larger training sample
changes nothing on such data (k-means cells of isotropic vectors are arbitrary).

A set searched against itself (``nearest(C, C, k)``, every identity center against all of
them) is searched with the same cells and the same probe lists as faiss's IndexIVFFlat (each
row probes the ``nprobe`` cells whose centroids are nearest to it), but cell by cell: the rows
probing a cell are multiplied by that cell's rows in one matrix product (bfloat16; the final
candidates re-scored in float32). faiss scans the probed vectors query by query from memory;
the products keep them in cache: 200k random 512-d rows took 180 s in faiss and a fraction of
that here, with the same neighbours found.
"""
import math
import time

import numpy as np

EXACT_PAIRS = 4e9  # queries x base up to which the CPU search is exact (~4e12 flops at d = 512)


def nearest(queries, base, k, *, device="cpu", method=None, nlist=None, nprobe=None, seed=0,
            block=1 << 14, progress=False):
    """The k rows of ``base`` most similar to each row of ``queries``.

    Returns ``(S, I, info)``: cosines S (float32, q x k, descending), base row numbers I (int64,
    -1 where base has fewer than k rows) and ``info`` (method, device, nlist, nprobe) for reports.
    ``method``: "exact", "ivf" or None (exact up to EXACT_PAIRS pairs or on a GPU, else IVF);
    ``nlist``/``nprobe``: IVF cells and cells searched per query (None: the defaults above).
    ``info`` also holds ``train_add_s`` and ``search_s``, the seconds of building and searching.
    """
    self_join = queries is base
    queries = np.ascontiguousarray(queries, np.float32)
    base = queries if self_join else np.ascontiguousarray(base, np.float32)
    if queries.ndim != 2 or base.ndim != 2 or queries.shape[1] != base.shape[1]:
        raise ValueError(f"queries {queries.shape} and base {base.shape} must be 2-D with one width")
    k = int(k)
    cuda = str(device).startswith("cuda")
    if method is None:
        method = "exact" if cuda or len(queries) * len(base) <= EXACT_PAIRS else "ivf"
    if method not in ("exact", "ivf"):
        raise ValueError(f"unknown search method {method!r}: exact or ivf")
    if cuda:
        if method != "exact":
            raise ValueError("the GPU search is exact; leave the method unset")
        t0 = time.perf_counter()
        S, I = _torch_exact(queries, base, k, device, block, progress)
        return S, I, {"method": "exact", "device": str(device), "train_add_s": 0.0,
                      "search_s": time.perf_counter() - t0}
    import faiss
    d = base.shape[1]
    t0 = time.perf_counter()
    if method == "ivf":
        nlist = int(nlist or min(16384, max(16, 2 ** round(math.log2(math.sqrt(len(base)))))))
        nlist = min(nlist, len(base))
        nprobe = min(nlist, int(nprobe or max(1, nlist // 8)))
    if method == "ivf" and self_join:
        S, I, timing = _ivf_join(base, k, nlist, nprobe, seed, progress)
        return S, I, {"method": "ivf", "device": "cpu", "nlist": nlist, "nprobe": nprobe,
                      "engine": "blocked IVF join (bfloat16 products)", **timing}
    if method == "exact":
        index = faiss.IndexFlatIP(d)
        info = {"method": "exact", "device": "cpu"}
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = base
        if len(base) > 64 * nlist:
            train = base[np.sort(np.random.default_rng(seed).choice(len(base), 64 * nlist, replace=False))]
        index.train(train)
        index.nprobe = nprobe
        info = {"method": "ivf", "device": "cpu", "nlist": nlist, "nprobe": nprobe, "engine": "faiss IndexIVFFlat"}
    index.add(base)
    info["train_add_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = np.empty((len(queries), k), np.float32)
    I = np.empty((len(queries), k), np.int64)
    steps = range(0, len(queries), block)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"search ({info['method']})", unit="block", leave=False)
    for s in steps:
        S[s:s + block], I[s:s + block] = index.search(queries[s:s + block], k)
    info["search_s"] = time.perf_counter() - t0
    return S, I, info


def _torch_exact(queries, base, k, device, block, progress):
    import torch
    b = torch.from_numpy(base).to(device)
    b16 = b.half()
    block = max(1, min(block, (1 << 30) // max(1, len(base))))  # a block x base product of at most 2 GB
    extra = min(len(base), k + 16)  # fp16 products pick the candidates, float32 orders them
    S = np.full((len(queries), k), -np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    steps = range(0, len(queries), block)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="search (exact, gpu)", unit="block", leave=False)
    for s in steps:
        q = torch.from_numpy(queries[s:s + block]).to(device)
        cand = (q.half() @ b16.T).topk(extra, dim=1).indices
        exact = torch.einsum("qd,qkd->qk", q, b[cand])
        top = exact.topk(min(k, extra), dim=1)
        n = top.values.shape[1]
        S[s:s + len(q), :n] = top.values.cpu().numpy()
        I[s:s + len(q), :n] = torch.gather(cand, 1, top.indices).cpu().numpy()
    return S, I


def _ivf_join(x, k, nlist, nprobe, seed, progress, query_rows=1 << 13):
    """k nearest rows of x for every row of x, each row searched in the nprobe cells nearest to it."""
    import faiss
    import torch
    t0 = time.perf_counter()
    n, d = x.shape
    sample = x
    if n > 64 * nlist:
        sample = x[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=64)
    km.train(sample)
    assign = faiss.IndexFlatIP(d)
    assign.add(km.centroids)
    probe = np.empty((n, nprobe), np.int32)
    for s in range(0, n, 1 << 16):
        probe[s:s + (1 << 16)] = assign.search(x[s:s + (1 << 16)], nprobe)[1]
    # rows sorted by their own (nearest) cell: a cell is a contiguous block
    order = np.argsort(probe[:, 0], kind="stable")
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(n, dtype=np.int32)
    bounds = np.searchsorted(probe[order, 0], np.arange(nlist + 1))
    # the rows probing each cell (int32 throughout: 2M rows x 128 probes is 1 GB per array)
    flat = probe.ravel()
    pbounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=nlist))])
    by_cell = np.argsort(flat, kind="stable")
    del probe, flat
    probers = rank[by_cell // nprobe]
    del by_cell
    xf = torch.from_numpy(x)
    xb = xf[torch.from_numpy(order)].to(torch.bfloat16)
    order_t = torch.from_numpy(order)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = k + 8  # bfloat16 products pick the candidates, float32 orders them
    run_v = torch.full((n, m), -np.inf)
    run_i = torch.full((n, m), -1, dtype=torch.int64)
    cells = range(nlist)
    if progress:
        from tqdm import tqdm
        cells = tqdm(cells, desc="search (ivf)", unit="cell", leave=False)
    for c in cells:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        if lo == hi:
            continue
        members = xb[lo:hi]
        q_all = torch.from_numpy(probers[pbounds[c]:pbounds[c + 1]]).long()
        for s in range(0, len(q_all), query_rows):
            q = q_all[s:s + query_rows]
            sims = (xb[q] @ members.T).float()
            # only rows with a product above their current m-th best can change (most, after a few cells)
            live = (sims > run_v[q, -1:]).any(1)
            q, sims = q[live], sims[live]
            v, j = sims.topk(min(m, hi - lo), dim=1)
            mv = torch.cat([run_v[q], v], 1)
            mi = torch.cat([run_i[q], j + lo], 1)
            tv, ti = mv.topk(m, dim=1)
            run_v[q] = tv
            run_i[q] = torch.gather(mi, 1, ti)
    S = np.full((n, k), -np.inf, np.float32)
    I = np.full((n, k), -1, np.int64)
    for s in range(0, n, query_rows):
        cand = run_i[s:s + query_rows]
        exact = torch.einsum("qd,qkd->qk", xf[order_t[s:s + query_rows]], xf[order_t[cand.clamp(min=0)]])
        exact[cand < 0] = -np.inf
        top = exact.topk(k, dim=1)
        idx = torch.gather(cand, 1, top.indices).numpy()
        rows = order[s:s + query_rows]
        S[rows] = top.values.numpy()
        I[rows] = np.where(idx >= 0, order[idx.clip(0)], -1)
    S[I < 0] = -np.inf
    return S, I, {"train_add_s": train_s, "search_s": time.perf_counter() - t0}
