"""The inverted-file search of identity centers: the blocked search of ``neighbours.py`` against
faiss's own IndexIVFFlat scan, with the same cells count and probe fraction, on random unit
centers with planted pairs (one identity's center at cosine ``--cos`` of another's).

Both search every center against all of them (as ``conflicts`` does) for its k = 9 nearest;
printed: seconds of training (k-means) and search, the recall of the planted pairs (found from
either row) and the exact search of a sample of centers as the reference of the nearest-other
cosines. The blocked search and the scan probe the same cells; the k-means runs differ (the
blocked search trains spherical k-means, IndexIVFFlat plain k-means, both on up to 256 rows per cell).

    python bench/ivf_search.py --n 200000 --save ivf_search_200k    # on an idle machine
"""
import argparse
import time

import numpy as np

from common import save, table


def planted(n, d, pairs, cos, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = rng.choice(n // 2, pairs, replace=False)
    b = a + n // 2
    noise = rng.standard_normal((pairs, d)).astype(np.float32)
    noise -= (noise * x[a]).sum(1, keepdims=True) * x[a]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[b] = cos * x[a] + np.sqrt(1 - cos ** 2) * noise
    return x, a, b


def main():
    import faiss
    import torch
    from plugins.face_nms.neighbours import nearest
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200000, help="centers")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--cos", type=float, default=0.7, help="cosine of a planted pair")
    p.add_argument("--save", metavar="NAME", help="save the result as bench/results/NAME.json")
    args = p.parse_args()
    torch.set_num_threads(faiss.omp_get_max_threads())
    x, a, b = planted(args.n, args.d, args.pairs, args.cos)
    k = 9

    def recall(I):
        return float(((I[a] == b[:, None]).any(1) | (I[b] == a[:, None]).any(1)).mean())

    t0 = time.perf_counter()
    S, I, info = nearest(x, x, k, method="ivf")
    blocked = {"engine": info["engine"], "train_s": info["train_add_s"], "search_s": info["search_s"],
               "wall_s": time.perf_counter() - t0, "recall": recall(I)}
    nlist, nprobe = info["nlist"], info["nprobe"]
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.d), args.d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = nprobe
    train = time.perf_counter() - t0
    t1 = time.perf_counter()
    Sf, If = index.search(x, k)
    scan = {"engine": "faiss IndexIVFFlat", "train_s": train, "search_s": time.perf_counter() - t1,
            "wall_s": time.perf_counter() - t0, "recall": recall(If)}
    sample = np.arange(0, args.n, max(1, args.n // 2000))
    Se, Ie, _ = nearest(x[sample].copy(), x, k, method="exact")
    for r, (Sr, Ir) in ((blocked, (S, I)), (scan, (Sf, If))):
        r["nearest_other_found"] = float((Ir[sample, 1] == Ie[:, 1]).mean())
    rows = [[r["engine"], nlist, nprobe, r["train_s"], r["search_s"], r["wall_s"], r["recall"],
             r["nearest_other_found"]] for r in (blocked, scan)]
    text = table(["engine", "nlist", "nprobe", "train s", "search s", "wall s", f"recall (cos {args.cos})",
                  "nearest other found"], rows)
    print(f"search speed-up {scan['search_s'] / blocked['search_s']:.1f}x")
    if args.save:
        save(args.save, {"n": args.n, "d": args.d, "pairs": args.pairs, "cos": args.cos, "blocked": blocked,
                         "faiss_scan": scan, "table": text})


if __name__ == "__main__":
    main()
