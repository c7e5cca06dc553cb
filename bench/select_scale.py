"""Face-NMS selection at scale on synthetic WebFace42M-shaped features.

Identity sizes are log-normal (mean near 17 faces, at most 800), a third of each identity's
faces form a near-duplicate session, features are 512-d float16, L2-normalised, memory-mapped,
and rows are shuffled as im2rec packs WebFace42M, so an identity's faces are scattered through
the file. The file is streamed to disk in chunks (no N x d array in memory).

Two kinds of points:
* ``--sizes``: one generated file per size;
* ``--big N --sizes A,B``: one generated N-face file, each size measured on its first rows (the
  prefix of a shuffled file: fewer faces per identity), in memory when the page cache holds it,
  out of core when it does not (the file's pages are dropped from the cache first);
* ``--largest M``: one of the identities has M faces (web-crawled sets have identities of tens of
  thousands of faces), the others as above.

Each point runs in its own process and reports wall time, peak anonymous memory (RssAnon,
sampled; file pages mapped do not count), peak RSS as the kernel counts it, bytes read from
disk, and two lower bounds measured in the same process on the same cache state, both starting
with one sequential read of the rows into float32: the physical bound adds the per-identity
pairwise work (sum of n_i^2 d multiply-adds) at the rate of a large float32 matrix product timed
in the same process; the batched bound adds batched matrix products of exactly that work (no
padding), timed (not taken for identities of more than 2,048 faces with ``--largest``: their
products are large matrix products, which the physical bound already times).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from common import peak_rss_mb, save, table


def identity_sizes(n, mean_size, rng, largest=0):
    """Log-normal identity sizes (at least 2, at most 800 faces) summing to n; with ``largest``,
    the first identity has that many faces."""
    if largest:
        return np.concatenate([[largest], identity_sizes(n - largest, mean_size, rng)])
    sizes = np.maximum(2, rng.lognormal(np.log(mean_size) - 0.6, 1.1, int(n / mean_size * 1.2) + 16)).astype(np.int64)
    sizes = np.minimum(sizes, 800)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    return sizes[sizes > 0]


def make_features(path, n, d=512, seed=0, mean_size=17.0, chunk=1 << 16, largest=0):
    """Streams an n x d float16 feature file to ``path``; returns the row labels.

    Identity centers are sums of three rows of small random tables picked by the label, so no
    num_classes x d array is held; a third of the faces form a near-duplicate session around an
    identity-specific offset of the center. Chunks are generated in parallel threads, each from
    its own seeded generator, so the file does not depend on the number of threads.
    """
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(seed)
    sizes = identity_sizes(n, mean_size, rng, largest)
    labels = np.repeat(np.arange(len(sizes)), sizes)[rng.permutation(n)]  # im2rec-style shuffle
    tables = rng.standard_normal((3, 4099, d)).astype(np.float32) / np.sqrt(3)
    phase = np.arange(d, dtype=np.float32)[None, :]
    feats = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))

    def fill(s):
        r = np.random.default_rng([seed, s // chunk])
        lab = labels[s:s + chunk]
        x = tables[0][lab % 4099] + tables[1][(lab // 4099) % 4099] + tables[2][(lab * 7 + 3) % 4099]
        burst = r.random(len(lab)) < 0.33
        noise = r.standard_normal((len(lab), d), dtype=np.float32)
        noise[~burst] *= 1.1
        noise[burst] *= 0.55
        x += noise
        x[burst] += 0.9 * np.sin(lab[burst, None].astype(np.float32) * 7.1 + phase)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        feats[s:s + chunk] = x

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(fill, range(0, n, chunk)))
    feats.flush()
    del feats
    return labels


class AnonPeak:
    """Peak RssAnon of this process, sampled every 20 ms in a thread."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def disk_read_bytes():
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def drop_from_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_pass(feats, chunk_rows=1 << 16):
    t0 = time.perf_counter()
    acc = 0.0
    for s in range(0, len(feats), chunk_rows):
        acc += float(np.asarray(feats[s:s + chunk_rows], dtype=np.float32)[:, 0].sum())
    return time.perf_counter() - t0


def gemm_rate(d, device, n=4096, seconds=1.0):
    """Multiply-adds per second of a large float32 matrix product (n x d by d x n)."""
    import torch
    dev = torch.device(device)
    a, b = torch.randn(n, d, device=dev), torch.randn(d, n, device=dev)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= seconds:
            break
    return reps * n * n * d / (time.perf_counter() - t0)


def pairwise_bound(labels, d, device, max_size=None):
    """(seconds of batched products of the per-identity pairwise work of identities of at most
    ``max_size`` faces, sum of n_i^2 d over all identities)."""
    import torch
    sizes = np.bincount(labels)
    t0 = time.perf_counter()
    dev = torch.device(device)
    for m in np.unique(sizes[sizes > 1]):
        if max_size and m > max_size:
            continue
        count = int((sizes == m).sum())
        per_batch = max(1, (1 << 24) // (m * d))
        x = torch.randn(min(count, per_batch), m, d, device=dev)
        for s in range(0, count, per_batch):
            b = min(per_batch, count - s)
            torch.bmm(x[:b], x[:b].transpose(1, 2))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, float((sizes.astype(np.float64) ** 2).sum() * d)


def generate(args):
    n = args.generate
    labels = make_features(os.path.join(args.work_dir, f"features_{n}.npy"), n, largest=args.largest)
    np.save(os.path.join(args.work_dir, f"labels_{n}.npy"), labels)


def measure(args):
    import torch
    from plugins.face_nms.select import select_core_set
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    src = args.big or args.measure
    n = args.measure
    path = os.path.join(args.work_dir, f"features_{src}.npy")
    feats = np.load(path, mmap_mode="r")[:n]
    labels = np.load(os.path.join(args.work_dir, f"labels_{src}.npy"))[:n]
    from plugins.face_nms.feature_stream import available_memory
    in_memory = feats.nbytes <= available_memory() * 3 // 4
    if in_memory:
        read_pass(feats)  # the page cache holds the rows for the bound and the selection alike
    else:
        drop_from_cache(path)
    read = read_pass(feats)
    matmul, work_flops = pairwise_bound(labels, feats.shape[1], args.device, 2048 if args.largest else None)
    rate = gemm_rate(feats.shape[1], args.device)
    if not in_memory:
        drop_from_cache(path)
    kw = dict(ratio=0.6) if args.mode == "ratio" else dict(threshold=args.threshold)
    io0, rss0 = disk_read_bytes(), AnonPeak.now()
    notes = []
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        sel = select_core_set(feats, labels, device=args.device, spill_dir=args.spill_dir or args.work_dir,
                              log=notes.append, **kw)
        wall = time.perf_counter() - t0
    read_bytes = disk_read_bytes() - io0
    if args.save_keep:
        np.save(os.path.join(args.save_keep, f"keep_{n}_{args.mode}.npy"), sel.keep)
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]
    print(json.dumps({"n": int(n), "file_gb": feats.nbytes / 1e9, "in_memory": bool(in_memory),
                      "identities": int(len(sizes)), "mean_size": float(sizes.mean()), "max_size": int(sizes.max()),
                      "wall_s": wall, "faces_per_s": n / wall, "peak_anon_mb": anon.peak / 2**20,
                      "anon_before_mb": rss0 / 2**20, "peak_rss_mb": peak_rss_mb(), "disk_read_gb": read_bytes / 1e9,
                      "read_s": read, "matmul_s": None if args.largest else matmul,
                      "lower_bound_s": None if args.largest else read + matmul,
                      "ratio_to_bound": None if args.largest else wall / (read + matmul), "pair_madds": work_flops,
                      "gemm_madds_per_s": rate, "physical_bound_s": read + work_flops / rate,
                      "ratio_to_physical": wall / (read + work_flops / rate), "pair_peak": sel.pair_peak,
                      "kept_fraction": sel.fraction, "threshold": sel.threshold, "passes": sel.passes,
                      "file_reads": sel.file_reads, "source": sel.source, "notes": notes}))


def main():
    import torch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="500000,1000000,2000000", help="comma-separated face counts")
    p.add_argument("--big", type=int, help="generate one file of this many faces and measure its prefixes")
    p.add_argument("--mode", default="threshold", choices=["threshold", "ratio"],
                   help="a given threshold or ratio=0.6 (threshold searched)")
    p.add_argument("--threshold", type=float, default=0.52, help="threshold of --mode threshold")
    p.add_argument("--largest", type=int, default=0, help="one identity of this many faces")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work-dir", default=None, help="where the feature files go (1.03 GB per 1M faces)")
    p.add_argument("--spill-dir", default=None, help="temporary files of out-of-core selection (default: --work-dir)")
    p.add_argument("--keep-files", action="store_true", help="leave the generated files in --work-dir")
    p.add_argument("--name", default=None, help="result name (default select_scale_<mode>[_big][_gpu])")
    p.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    p.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save-keep", help="folder receiving the kept rows of each point (keep_<n>_<mode>.npy), to "
                                       "compare selections across code versions")
    args = p.parse_args()
    if args.generate:
        return generate(args)
    if args.measure:
        return measure(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="face_nms_bench_")
    os.makedirs(work, exist_ok=True)
    common = ["--work-dir", work, "--device", args.device, "--mode", args.mode, "--threshold", str(args.threshold),
              "--largest", str(args.largest)]
    if args.spill_dir:
        common += ["--spill-dir", args.spill_dir]
    if args.save_keep:
        common += ["--save-keep", args.save_keep]
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, results = [], []
    for src in ([args.big] if args.big else sizes):
        if not os.path.exists(os.path.join(work, f"features_{src}.npy")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--generate", str(src)] + common, check=True)
            print(f"generated {src} faces in {time.perf_counter() - t0:.0f} s", flush=True)
        for n in (sizes if args.big else [src]):
            extra = ["--big", str(args.big)] if args.big else []
            # each measurement in its own process: peak memory is the selection's own
            out = subprocess.run([sys.executable, __file__, "--measure", str(n)] + extra + common,
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            rows.append([n, r["identities"], "memory" if r["in_memory"] else "out of core", r["source"], r["wall_s"],
                         r["peak_anon_mb"], r["disk_read_gb"], r["read_s"], r["matmul_s"], r["ratio_to_bound"],
                         r["physical_bound_s"], r["ratio_to_physical"], r["passes"], r["file_reads"],
                         r["kept_fraction"]])
            print(json.dumps(r), flush=True)
        if not args.keep_files:
            for name in (f"features_{src}.npy", f"labels_{src}.npy"):
                os.remove(os.path.join(work, name))
    text = table(["faces", "identities", "file", "read as", "wall s", "peak anon MB", "disk read GB", "read s",
                  "matmul s", "wall/bound", "physical s", "wall/physical", "passes", "file reads", "kept"], rows)
    suffix = ("_big" if args.big else "") + (f"_largest{args.largest}" if args.largest else "") + \
        ("_gpu" if args.device.startswith("cuda") else "")
    save(args.name or f"select_scale_{args.mode}{suffix}", {"mode": args.mode, "device": args.device,
                                                             "results": results, "table": text})


if __name__ == "__main__":
    main()
