"""k nearest neighbours by cosine between sets of unit vectors (identity centers, faces).

Exact search: on the CPU a flat faiss index (float32 products) while queries x base is small
(``EXACT_PAIRS``), blocked bfloat16 products in torch beyond; on a CUDA device blocked fp16
products; the candidates of half-precision products are re-scored in float32. Approximate
search (``method="ivf"``, the CPU default beyond ``EXACT_PAIRS``): an inverted file, k-means
cells of the base trained with faiss, each query searched in the ``nprobe`` cells whose
centroids are nearest to it (the cells and probe lists of faiss's IndexIVFFlat).

The IVF search runs cell by cell rather than query by query: the queries probing a cell are
multiplied by that cell's rows in one matrix product (bfloat16, the final candidates re-scored
in float32), so the probed rows stay in cache instead of being read from memory once per
query as IndexIVFFlat's scan reads them. The same probe fraction, the same recall up to the
k-means run: 200k random 512-d rows searched against themselves took 217.5 s in IndexIVFFlat
and 26.2 s here on 2 cores, finding 0.997 and 0.9965 of the pairs at cosine 0.7
(bench/ivf_search.py).

IVF defaults: nlist = 2^round(log2(sqrt(n))) cells (16 .. 16384), trained on up to 256 nlist rows
(faiss warns below 39), nprobe = nlist / 8. Identity centers of a trained model spread nearly
uniformly on the sphere, where cells follow no cluster structure and recall depends on the
probed fraction nprobe / nlist more than on nlist. On 200k and 500k random 512-d unit vectors
with 2,000 planted pairs, nlist 512 .. 2048, a pair counted as found from either of its rows (as
``conflicts`` does), that fraction gave (recall of IndexIVFFlat; ranges over the runs):

    nprobe/nlist   cos 0.5     cos 0.6     cos 0.7     cos 0.86   search cost (of exact)
    1/64           0.46-0.49   0.57-0.60   0.76        0.95       1/64
    1/16           0.72-0.88   0.87-0.96   0.92-0.99   0.99-1.0   1/16
    1/8            0.91-0.95   0.955-0.99  0.99-1.0    1.0        1/8
    1/4            0.995       0.991       1.0         1.0        1/4

1/8 finds 99% of pairs at cosine 0.7 and all at 0.86; pairs near 0.5 need a larger fraction
(``nprobe``) or the exact search (``method="exact"``, or a GPU). A larger training sample
changes nothing on such data (k-means cells of isotropic vectors are arbitrary).
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
                      "search_s": time.perf_counter() - t0, "pairs": len(queries) * len(base)}
    import faiss
    d = base.shape[1]
    t0 = time.perf_counter()
    if method == "ivf":
        nlist = int(nlist or min(16384, max(16, 2 ** round(math.log2(math.sqrt(len(base)))))))
        nlist = min(nlist, len(base))
        nprobe = min(nlist, int(nprobe or max(1, nlist // 8)))
        S, I, timing = _ivf_join(queries, base, k, nlist, nprobe, seed, progress, self_join=self_join)
        return S, I, {"method": "ivf", "device": "cpu", "nlist": nlist, "nprobe": nprobe,
                      "engine": "blocked IVF (bfloat16 products)", **timing}
    if len(queries) * len(base) > EXACT_PAIRS:
        S, I = _torch_exact(queries, base, k, "cpu", block, progress)
        return S, I, {"method": "exact", "device": "cpu", "engine": "blocked bfloat16 products",
                      "train_add_s": 0.0, "search_s": time.perf_counter() - t0, "pairs": len(queries) * len(base)}
    index = faiss.IndexFlatIP(d)
    info = {"method": "exact", "device": "cpu", "engine": "faiss IndexFlatIP"}
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
    S[I < 0] = -np.inf  # faiss marks a missing neighbour with -FLT_MAX
    info["search_s"] = time.perf_counter() - t0
    info["pairs"] = len(queries) * len(base)
    return S, I, info


def _torch_exact(queries, base, k, device, block, progress):
    import torch
    cuda = str(device).startswith("cuda")
    b = torch.from_numpy(base).to(device)
    b16 = b.to(torch.float16 if cuda else torch.bfloat16)
    # a block x base product of at most 2 GB on a GPU, 256 MB on the CPU
    block = max(1, min(block, (1 << (30 if cuda else 27)) // max(1, len(base))))
    extra = min(len(base), k + 16)  # half-precision products pick the candidates, float32 orders them
    S = np.full((len(queries), k), -np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    steps = range(0, len(queries), block)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"search (exact, {'gpu' if cuda else 'cpu'})", unit="block", leave=False)
    for s in steps:
        q = torch.from_numpy(queries[s:s + block]).to(device)
        cand = (q.to(b16.dtype) @ b16.T).topk(extra, dim=1).indices
        values, rows = _rescore(q, b, cand, k)
        n = values.shape[1]
        S[s:s + len(q), :n] = values.cpu().numpy()
        I[s:s + len(q), :n] = rows.cpu().numpy()
    return S, I


def _ivf_join(queries, base, k, nlist, nprobe, seed, progress, self_join=False, query_rows=1 << 13):
    """k nearest rows of base for every query, each query searched in the nprobe cells nearest to it."""
    import faiss
    import torch
    t0 = time.perf_counter()
    n, d = base.shape
    sample = base
    if n > 256 * nlist:
        sample = base[np.sort(np.random.default_rng(seed).choice(n, 256 * nlist, replace=False))]
    km = faiss.Kmeans(d, nlist, niter=10, seed=seed, spherical=True, max_points_per_centroid=256)
    km.train(sample)
    assign = faiss.IndexFlatIP(d)
    assign.add(km.centroids)
    probe = np.empty((len(queries), nprobe), np.int32)
    for s in range(0, len(queries), 1 << 16):
        probe[s:s + (1 << 16)] = assign.search(queries[s:s + (1 << 16)], nprobe)[1]
    cell = probe[:, 0] if self_join else np.concatenate(
        [assign.search(base[s:s + (1 << 16)], 1)[1][:, 0] for s in range(0, n, 1 << 16)])
    # base rows sorted by cell: a cell is a contiguous block
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(nlist + 1))
    # the queries probing each cell (int32: 2M queries x 128 probes is 1 GB per array)
    flat = probe.ravel()
    pbounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=nlist))])
    by_cell = np.argsort(flat, kind="stable")
    del probe, flat, cell
    probers = (by_cell // nprobe).astype(np.int32)
    del by_cell
    bf = torch.from_numpy(base)
    qf = torch.from_numpy(queries)
    order_t = torch.from_numpy(order)
    members_all = bf.to(torch.bfloat16)[order_t]
    qb = qf.to(torch.bfloat16)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = k + 8  # bfloat16 products pick the candidates, float32 orders them
    pairs = int(np.diff(pbounds) @ np.diff(bounds))
    run_v = torch.full((len(queries), m), -np.inf)
    run_i = torch.full((len(queries), m), -1, dtype=torch.int64)
    cells = range(nlist)
    if progress:
        from tqdm import tqdm
        cells = tqdm(cells, desc="search (ivf)", unit="cell", leave=False)
    for c in cells:
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        if lo == hi:
            continue
        members = members_all[lo:hi]
        q_all = torch.from_numpy(probers[pbounds[c]:pbounds[c + 1]]).long()
        for s in range(0, len(q_all), query_rows):
            q = q_all[s:s + query_rows]
            sims = (qb[q] @ members.T).float()
            # only rows with a product above their current m-th best can change (most, after a few cells)
            live = (sims > run_v[q, -1:]).any(1)
            q, sims = q[live], sims[live]
            v, j = sims.topk(min(m, hi - lo), dim=1)
            mv = torch.cat([run_v[q], v], 1)
            mi = torch.cat([run_i[q], j + lo], 1)
            tv, ti = mv.topk(m, dim=1)
            run_v[q] = tv
            run_i[q] = torch.gather(mi, 1, ti)
    del members_all, qb
    S = np.full((len(queries), k), -np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(queries), query_rows):
        at = run_i[s:s + query_rows]  # positions in cell order, -1: none
        values, rows = _rescore(qf[s:s + query_rows], bf, torch.where(at >= 0, order_t[at.clamp(min=0)], -1), k)
        S[s:s + query_rows] = values.numpy()
        I[s:s + query_rows] = rows.numpy()
    S[I < 0] = -np.inf
    return S, I, {"train_add_s": train_s, "search_s": time.perf_counter() - t0, "pairs": pairs}


def _rescore(q, base, cand, k):
    """(float32 cosines, base rows) of the k of the candidate rows ``cand`` (one row of base row
    numbers per query, -1: none) most similar to each query of ``q``, in descending order."""
    import torch
    exact = torch.einsum("qd,qkd->qk", q, base[cand.clamp(min=0)])
    exact[cand < 0] = -float("inf")
    top = exact.topk(min(k, cand.shape[1]), dim=1)
    return top.values, cand.gather(1, top.indices)
