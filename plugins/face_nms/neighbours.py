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
    queries = np.ascontiguousarray(queries, np.float32)
    base = np.ascontiguousarray(base, np.float32)
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
    if method == "exact":
        index = faiss.IndexFlatIP(d)
        info = {"method": "exact", "device": "cpu"}
    else:
        nlist = int(nlist or min(16384, max(16, 2 ** round(math.log2(math.sqrt(len(base)))))))
        nlist = min(nlist, len(base))
        nprobe = min(nlist, int(nprobe or max(1, nlist // 8)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = base
        if len(base) > 64 * nlist:
            train = base[np.sort(np.random.default_rng(seed).choice(len(base), 64 * nlist, replace=False))]
        index.train(train)
        index.nprobe = nprobe
        info = {"method": "ivf", "device": "cpu", "nlist": nlist, "nprobe": nprobe}
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
