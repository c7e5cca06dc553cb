"""Face-NMS selection at scale on synthetic WebFace42M-shaped features.

Identity sizes are long-tailed (mean near 20 faces, a tail of several hundred) with near-duplicate
bursts inside identities; features are 512-d float16, memory-mapped, shuffled as im2rec packs
WebFace42M. Each size runs in its own process (peak RSS is per process). The lower bound measured in
the same process: one pass reading the feature file, plus batched matrix products of exactly the
per-identity pairwise work (sum of n_i^2 d multiply-adds, no padding).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import peak_rss_mb, save, table


def make_features(path, n, d=512, seed=0, mean_size=20.0):
    rng = np.random.default_rng(seed)
    sizes = []
    total = 0
    while total < n:
        s = int(min(max(2, rng.lognormal(np.log(mean_size) - 0.6, 1.1)), 800))
        sizes.append(s)
        total += s
    sizes[-1] -= total - n
    sizes = np.array([s for s in sizes if s > 0])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(n)  # im2rec-style shuffle
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    centers = rng.standard_normal((len(sizes), d)).astype(np.float32)
    chunk = 1 << 16
    inv_labels = labels[perm]
    for s in range(0, n, chunk):
        lab = inv_labels[s:s + chunk]
        x = centers[lab] + 1.1 * rng.standard_normal((len(lab), d), dtype=np.float32)
        # near-duplicate bursts: a third of the faces are a small perturbation of their identity's anchor
        burst = rng.random(len(lab)) < 0.33
        x[burst] = centers[lab[burst]] * 1.0 + 0.55 * rng.standard_normal((int(burst.sum()), d), dtype=np.float32) \
            + 0.9 * np.sin(lab[burst, None] * 7.1 + np.arange(d)[None, :])
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        feats[s:s + chunk] = x
    feats.flush()
    return inv_labels, sizes


def lower_bound(path, labels, chunk_rows, device):
    import torch
    feats = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    acc = 0.0
    for s in range(0, len(feats), chunk_rows):
        acc += float(np.asarray(feats[s:s + chunk_rows], dtype=np.float32)[:, 0].sum())
    read = time.perf_counter() - t0
    sizes = np.bincount(labels)
    d = feats.shape[1]
    t0 = time.perf_counter()
    dev = torch.device(device)
    for m in np.unique(sizes[sizes > 1]):
        count = int((sizes == m).sum())
        per_batch = max(1, (1 << 24) // (m * d))
        x = torch.randn(min(count, per_batch), m, d, device=dev)
        for s in range(0, count, per_batch):
            b = min(per_batch, count - s)
            torch.bmm(x[:b], x[:b].transpose(1, 2))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    matmul = time.perf_counter() - t0
    pair_work = float((sizes.astype(np.float64) ** 2).sum() * d)
    return read, matmul, pair_work


def generate(args):
    labels, _ = make_features(os.path.join(args.work_dir, f"features_{args.generate}.npy"), args.generate)
    np.save(os.path.join(args.work_dir, f"labels_{args.generate}.npy"), labels)


def measure(args):
    import torch
    from plugins.face_nms.select import select_core_set
    torch.set_num_threads(os.cpu_count())
    work = args.work_dir
    path = os.path.join(work, f"features_{args.measure}.npy")
    labels = np.load(os.path.join(work, f"labels_{args.measure}.npy"))
    feats = np.load(path, mmap_mode="r")
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    if args.mode == "ratio":
        sel = select_core_set(feats, labels, ratio=0.6, device=args.device, workdir=work)
    else:
        sel = select_core_set(feats, labels, threshold=args.threshold, device=args.device, workdir=work)
    wall = time.perf_counter() - t0
    rss = peak_rss_mb()
    read, matmul, work_flops = lower_bound(path, labels, 1 << 17, args.device)
    sizes = np.bincount(labels)
    print(json.dumps({"n": int(args.measure), "identities": int((sizes > 0).sum()), "mean_size": float(sizes.mean()),
                      "max_size": int(sizes.max()), "wall_s": wall, "faces_per_s": args.measure / wall,
                      "peak_rss_mb": rss, "rss_before_mb": rss0, "read_s": read, "matmul_s": matmul,
                      "lower_bound_s": read + matmul, "ratio_to_bound": wall / (read + matmul),
                      "pair_madds": work_flops, "kept_fraction": sel.fraction, "threshold": sel.threshold,
                      "passes": sel.passes}))


def main():
    import torch
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="500000,1000000,2000000", help="comma-separated face counts")
    p.add_argument("--mode", default="threshold", choices=["threshold", "ratio"],
                   help="a given threshold (one pass) or ratio=0.6 (threshold search, several passes)")
    p.add_argument("--threshold", type=float, default=0.52, help="0.52 keeps about 60%% of these features")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work-dir", default=None, help="where the feature files go (needs 1 GiB per 1M faces)")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    p.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.generate:
        return generate(args)
    if args.measure:
        return measure(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="face_nms_bench_")
    os.makedirs(work, exist_ok=True)
    rows, results = [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        common = ["--work-dir", work, "--device", args.device, "--mode", args.mode, "--threshold", str(args.threshold)]
        # generation and measurement in separate processes: peak RSS is the selection's own
        subprocess.run([sys.executable, __file__, "--generate", str(n)] + common, check=True)
        out = subprocess.run([sys.executable, __file__, "--measure", str(n)] + common, capture_output=True, text=True)
        for name in (f"features_{n}.npy", f"labels_{n}.npy"):
            os.remove(os.path.join(work, name))
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        rows.append([n, r["identities"], r["wall_s"], r["faces_per_s"], r["peak_rss_mb"], r["read_s"], r["matmul_s"],
                     r["ratio_to_bound"], r["passes"], r["kept_fraction"]])
    text = table(["faces", "identities", "wall s", "faces/s", "peak RSS MB", "read s", "matmul s", "wall/bound",
                  "passes", "kept"], rows)
    # linear fit of wall time in N (the work per identity does not grow with N)
    ns = np.array([r["n"] for r in results], float)
    ws = np.array([r["wall_s"] for r in results])
    slope, intercept = np.polyfit(ns, ws, 1) if len(ns) > 1 else (ws[0] / ns[0], 0.0)
    extrapolated = slope * 42.5e6 + intercept
    print(f"\nextrapolated to 42.5M faces: {extrapolated / 3600:.2f} h on this machine "
          f"(linear fit of wall time in N: {slope * 1e6:.3f} s per 1M faces + {intercept:.1f} s)")
    suffix = "_gpu" if args.device.startswith("cuda") else ""
    save(f"select_scale_{args.mode}{suffix}", {"mode": args.mode, "device": args.device, "results": results, "table": text,
                                       "extrapolated_42_5M_s": extrapolated,
                                       "extrapolation": "linear least-squares fit of wall time against N"})


if __name__ == "__main__":
    main()
