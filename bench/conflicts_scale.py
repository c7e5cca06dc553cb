"""Identity conflicts at scale: synthetic 512-d float16 features of many identities with planted
duplicates (one identity's faces split under two labels), written as extract writes them.

Identity centers are random on the sphere; each face is a C_y + sqrt(1 - a^2) u with a^2 (the
cosine of two faces of one identity) uniform in [0.5, 0.8]; identities have 2..5 faces, and
``--dup`` of them (a fraction) are split in two labels. Rows are in identity order (the centers
pass reads the file sequentially whatever the order; generating by label ranges needs no
num_classes x d array). The measurement runs in its own process and prints the time of each
stage (centers pass, index train/add, search, faces check), peak anonymous memory, recall and
precision on the planted pairs at the default threshold, and the ratio of the wall time to a
bound measured in the same process at the full size: one sequential read of the feature file
plus the search's matrix products alone (the query-row pairs the search multiplies, exact or
IVF, at the multiply-add rate of a product of the same kind timed on this device just before).

    python bench/conflicts_scale.py --ids 100000            # a check (about a minute here)
    python bench/conflicts_scale.py --ids 2000000 --save conflicts_2M   # on an idle machine
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
from select_scale import AnonPeak, read_pass


def make(work, n_ids, dup, d=512, seed=0, block=1 << 14):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 6, n_ids)
    split = np.sort(rng.choice(n_ids, int(n_ids * dup), replace=False))
    labels = np.repeat(np.arange(n_ids), sizes)
    n = len(labels)
    feats = np.lib.format.open_memmap(os.path.join(work, "features.npy"), mode="w+", dtype=np.float16, shape=(n, d))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for s in range(0, n_ids, block):
        r = np.random.default_rng([seed, s])
        c = r.standard_normal((min(block, n_ids - s), d)).astype(np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        lab = labels[starts[s]:starts[min(n_ids, s + block)]]
        a = np.sqrt(r.uniform(0.5, 0.8, len(c)))[lab - s, None]
        u = r.standard_normal((len(lab), d)).astype(np.float32)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        x = a * c[lab - s] + np.sqrt(1 - a * a) * u
        feats[starts[s]:starts[s] + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        print(f"generated {min(n_ids, s + block)} / {n_ids} identities", end="\r", flush=True)
    feats.flush()
    for j, y in enumerate(split):
        labels[starts[y]:starts[y + 1]][::2] = n_ids + j
    np.save(os.path.join(work, "labels.npy"), labels)
    np.save(os.path.join(work, "planted.npy"), np.stack([split, n_ids + np.arange(len(split))], 1))
    print()


def product_rate(device, d=512):
    """Multiply-adds per second of the search's matrix products on this device: bfloat16 on the CPU
    (a cell's rows times the rows probing it), fp16 on a GPU (a block of queries times all rows)."""
    import torch
    cuda = device.startswith("cuda")
    a = torch.randn(8192, d, device=device).to(torch.float16 if cuda else torch.bfloat16)
    b = torch.randn(d, 65536 if cuda else 2048, device=device).to(a.dtype)
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return a.shape[0] * b.shape[0] * b.shape[1] / best


def measure(args):
    import torch
    from plugins.face_nms.conflicts import find_conflicts
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    feats = np.load(os.path.join(args.work_dir, "features.npy"), mmap_mode="r")
    labels = np.load(os.path.join(args.work_dir, "labels.npy"))
    planted = {tuple(p) for p in np.load(os.path.join(args.work_dir, "planted.npy")).tolist()}
    read = read_pass(feats)
    rate = product_rate(args.device, feats.shape[1])
    notes = []
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        res = find_conflicts(feats, labels, device=args.device, method=args.method, nprobe=args.nprobe,
                             progress=True, log=lambda line: (notes.append(line), print(line, file=sys.stderr,
                                                                                      flush=True)))
        wall = time.perf_counter() - t0
    got = {(a, b) for a, b, _ in res.label_pairs()}
    hits = len(got & planted)
    search = res.timings.get("search_s", 0.0)
    products = res.search["pairs"] * feats.shape[1] / rate
    print(json.dumps({"faces": int(len(labels)), "identities": int(len(res.ids)), "file_gb": feats.nbytes / 1e9,
                      "device": args.device, "search": res.search, "threshold": res.threshold,
                      "wall_s": wall, **res.timings, "read_s": read, "products_s": products,
                      "multiply_adds_per_s": rate, "bound_s": read + products,
                      "ratio_to_bound": wall / (read + products), "peak_anon_mb": anon.peak / 2**20,
                      "peak_rss_mb": peak_rss_mb(), "planted": len(planted), "pairs": len(got),
                      "recall": hits / max(1, len(planted)), "precision": hits / max(1, len(got)),
                      "flagged_faces": int(len(res.face_rows)), "notes": notes}))


def main():
    import torch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ids", type=int, default=100000, help="identities (before the split)")
    p.add_argument("--dup", type=float, default=0.01, help="fraction of identities split under two labels")
    p.add_argument("--device", default="cpu", help="cpu (faiss) or cuda (exact blocked products)")
    p.add_argument("--method", choices=["exact", "ivf"], help="CPU search (default: by size)")
    p.add_argument("--nprobe", type=int, help="IVF cells searched (default: nlist / 8)")
    p.add_argument("--work-dir", help="where the feature file goes (about 3.5 GB per 1M identities)")
    p.add_argument("--save", metavar="NAME", help="save the result as bench/results/NAME.json")
    p.add_argument("--keep-data", action="store_true", help="leave the generated files in --work-dir")
    p.add_argument("--reuse", action="store_true",
                   help="measure the files an earlier --keep-data run of the same --ids/--dup left in --work-dir")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="face_nms_conflicts_")
    os.makedirs(work, exist_ok=True)
    params = {"ids": args.ids, "dup": args.dup}
    params_path = os.path.join(work, "params.json")
    if args.reuse:
        if not os.path.exists(params_path) or json.load(open(params_path)) != params:
            sys.exit(f"--reuse: {work} holds no data generated with {params}; run once with --keep-data")
    else:
        t0 = time.perf_counter()
        make(work, args.ids, args.dup)
        with open(params_path, "w") as f:
            json.dump(params, f)
        print(f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
    cmd = [sys.executable, __file__, "--measure", "--work-dir", work, "--device", args.device]
    cmd += ["--method", args.method] if args.method else []
    cmd += ["--nprobe", str(args.nprobe)] if args.nprobe else []
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its own process: peak memory is its own
    finally:
        if not args.keep_data:
            for name in ("features.npy", "labels.npy", "planted.npy", "params.json"):
                if os.path.exists(os.path.join(work, name)):
                    os.remove(os.path.join(work, name))
            if not args.work_dir:
                os.rmdir(work)
    if out.returncode:
        sys.exit(out.returncode)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    text = table(["faces", "identities", "search", "centers s", "train/add s", "search s", "faces s", "wall s",
                  "read s", "products s", "wall/bound", "peak anon MB", "recall", "precision"],
                 [[r["faces"], r["identities"], f"{r['search']['method']} {r['search'].get('nlist', '')}/"
                   f"{r['search'].get('nprobe', '')}", r["centers_s"], r.get("train_add_s", 0), r["search_s"],
                   r["faces_s"], r["wall_s"], r["read_s"], r["products_s"], r["ratio_to_bound"], r["peak_anon_mb"],
                   r["recall"], r["precision"]]])
    if args.save:
        save(args.save, {"result": r, "table": text})


if __name__ == "__main__":
    main()
