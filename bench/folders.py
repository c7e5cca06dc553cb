"""Image folder datasets: listing a large tree, extraction from a folder against the same images in
RecordIO, and selection on a folder's features.

listing: a tree of --files empty .jpg files (--per-id per identity folder) is listed three ways, each in
its own process: a bare os.scandir walk of the names (the bound: the directory entries must be read
once), torchvision's own ImageFolder listing (find_classes + make_dataset) and ours (scandir + a stat of
every image for sizes and mtimes, the sort and the file-list digest, and the sampled content digest).
extraction: --extract-images real 112x112 JPEGs as a folder and packed into RecordIO, extracted with the
demo's small CNN on the CPU. selection: synthetic float16 features, one per file of the listing tree,
selected at ratio 0.6 by the select command (listing, provenance check, selection, the .txt and summary).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import ROOT, save, table

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
root, how = {tree!r}, {how!r}
if how == "torchvision":
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
elif how == "ours":
    from plugins.face_nms.datasets import open_dataset
def hwm(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
base = hwm("VmRSS")
t = time.perf_counter()  # after the imports
if how in ("scandir", "scandir+stat"):
    n, stack, with_stat = 0, [root], how == "scandir+stat"
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir():
                    stack.append(e.path)
                else:
                    n += 1
                    if with_stat:
                        e.stat()
elif how == "torchvision":
    n = len(make_dataset(root, find_classes(root)[1], IMG_EXTENSIONS))
else:
    ds = open_dataset(root, progress=False)
    n = len(ds.files)
    t_list = time.perf_counter() - t
    ds.provenance()
print(json.dumps({{"files": n, "seconds": time.perf_counter() - t,
                  "list_seconds": t_list if how == "ours" else None,
                  "peak_rss_mb": hwm("VmHWM"), "rss_after_imports_mb": base}}))
"""


def make_tree(root, files, per_id):
    if os.path.isdir(root) and os.path.exists(root + ".complete"):
        return
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    from tqdm import tqdm  # noqa: E402
    ids = (files + per_id - 1) // per_id
    with tqdm(total=files, desc="tree", unit="file", unit_scale=True, mininterval=5) as bar:
        for i in range(ids):
            d = os.path.join(root, f"{i:07d}")
            os.mkdir(d)
            for j in range(min(per_id, files - i * per_id)):
                os.close(os.open(os.path.join(d, f"{j:03d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
            bar.update(min(per_id, files - i * per_id))
    open(root + ".complete", "w").close()


def child(tree, how):
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, tree=tree, how=how)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_listing(tree, files):
    out = {}
    for how in ("scandir", "scandir", "scandir+stat", "torchvision", "ours"):  # the first scandir warms the cache
        out[how] = child(tree, how)
        assert out[how]["files"] == files, out[how]
    b, bs = out["scandir"]["seconds"], out["scandir+stat"]["seconds"]
    rows = [[how, f"{r['seconds']:.1f}", f"{r['seconds'] / b:.2f}", f"{r['seconds'] / bs:.2f}",
             f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f}",
             f"{(r['peak_rss_mb'] - r['rss_after_imports_mb']) * 2 ** 20 / files:.0f}"] for how, r in out.items()]
    table(["listing", "seconds", "/ bare scandir", "/ scandir+stat", "memory MB", "bytes/file"], rows)
    return out


def bench_extract(n, work):
    import torch
    from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
    from plugins.face_nms.extract import extract_features
    from plugins.face_nms.models import TorchModel
    from PIL import Image
    images, labels, _ = synthetic_faces(n_ids=max(1, n // 12), seed=0)
    reps = -(-n // len(images))
    images, labels = np.concatenate([images] * reps)[:n], np.concatenate([labels] * reps)[:n]
    folder = os.path.join(work, "faces")
    for i, (im, y) in enumerate(zip(images, labels)):
        d = os.path.join(folder, f"id{y:05d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(im).save(os.path.join(d, f"{i:06d}.jpg"), quality=95)
    rec = os.path.join(work, "rec")
    write_recordio(rec, images, labels, "im2rec")
    torch.set_num_threads(2)
    res = {}
    for name, src in (("folder", folder), ("recordio", rec)):
        t = time.perf_counter()
        extract_features(src, os.path.join(work, f"f_{name}"), TorchModel(TinyNet(), "cpu"), batch_size=64,
                         workers=2, progress=False)
        res[name] = {"faces": n, "seconds": time.perf_counter() - t}
        res[name]["faces_per_s"] = n / res[name]["seconds"]
    table(["extract from", "faces", "seconds", "faces/s"],
          [[k, v["faces"], f"{v['seconds']:.1f}", f"{v['faces_per_s']:.0f}"] for k, v in res.items()])
    return res


def bench_select(tree, work, dim):
    from plugins.face_nms.datasets import open_dataset
    ds = open_dataset(tree, progress=False)
    n = len(ds)
    feat_dir = os.path.join(work, "features")
    os.makedirs(feat_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    f = np.lib.format.open_memmap(os.path.join(feat_dir, "features.npy"), "w+", np.float16, (n, dim))
    centers = rng.standard_normal((ds.num_classes, dim)).astype(np.float32)
    for s in range(0, n, 1 << 18):
        y = ds.labels[s:s + (1 << 18)]
        x = centers[y] + 0.9 * rng.standard_normal((len(y), dim)).astype(np.float32)
        f[s:s + len(y)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    f.flush()
    del f
    np.save(os.path.join(feat_dir, "labels.npy"), ds.labels)
    np.save(os.path.join(feat_dir, "keys.npy"), ds.keys)
    with open(os.path.join(feat_dir, "meta.json"), "w") as fh:
        json.dump({"model": "synthetic", "count": n, "dimension": dim, "flip": False, "layout": "folder",
                   "provenance": {"dataset": ds.provenance(), "model": {"name": "synthetic"}, "flip": False}}, fh)
    # the select command's steps, timed one by one (as cmd_select runs them, page without identities)
    from plugins.face_nms.features import load_features
    from plugins.face_nms.gallery import selection_writer
    from plugins.face_nms.report import write_selection
    from plugins.face_nms.select import run_method
    out = os.path.join(work, "sel.txt")
    steps, t = {}, time.perf_counter()
    ds = open_dataset(tree, progress=False)
    ds.files
    steps["listing"] = time.perf_counter() - t
    t = time.perf_counter()
    feats, labels, keys, meta = load_features(feat_dir, ds)
    steps["provenance check"] = time.perf_counter() - t
    t = time.perf_counter()
    sel = run_method("nms", feats, labels, ratio=0.6, order="hard-first", seed=0, device="cpu",
                     spill_dir=work, chunk_rows=1 << 16, centers=None, threshold=None, progress=False)
    steps["selection"] = time.perf_counter() - t
    t = time.perf_counter()
    page = selection_writer(ds, feats, labels, ds.keys, None, sel, out, ids=0, seed=0)
    write_selection(out, ds.keys[sel.keep], None, sel, labels, dataset=meta["provenance"]["dataset"], page=page,
                    write=lambda path: ds.write_subset(path, sel.keep))
    steps["writing (.txt, summary, plots, page)"] = time.perf_counter() - t
    wall = sum(steps.values())
    kept = sum(1 for _ in open(out, encoding="utf-8"))
    res = {"faces": n, "identities": ds.num_classes, "dimension": dim, "wall_seconds": wall, "steps_seconds": steps,
           "peak_rss_mb": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024,
           "kept": kept, "kept_fraction": kept / n}
    table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in steps.items()])
    table(["select on folder", "faces", "wall s", "peak RSS MB", "kept"],
          [["ratio 0.6", n, f"{wall:.1f}", f"{res['peak_rss_mb']:.0f}", f"{kept / n:.4f}"]])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2_000_000)
    p.add_argument("--per-id", type=int, default=20)
    p.add_argument("--tree", default=os.path.join(tempfile.gettempdir(), "face_nms_folder_bench"))
    p.add_argument("--extract-images", type=int, default=10_000)
    p.add_argument("--select-dim", type=int, default=512)
    p.add_argument("--skip", nargs="*", default=[], choices=["listing", "extract", "select"])
    p.add_argument("--keep-tree", action="store_true", help="leave the listing tree for another run")
    p.add_argument("--name", help="result file name (default: folders_<files/1000>k)")
    a = p.parse_args()
    result = {"files": a.files, "per_id": a.per_id}
    work = tempfile.mkdtemp(prefix="face_nms_folders_")
    try:
        if "listing" not in a.skip or "select" not in a.skip:
            t = time.perf_counter()
            make_tree(a.tree, a.files, a.per_id)
            result["tree_build_seconds"] = time.perf_counter() - t
        if "listing" not in a.skip:
            result["listing"] = bench_listing(a.tree, a.files)
        if "extract" not in a.skip:
            result["extract"] = bench_extract(a.extract_images, work)
        if "select" not in a.skip:
            result["select"] = bench_select(a.tree, work, a.select_dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not a.keep_tree:
            shutil.rmtree(a.tree, ignore_errors=True)
            if os.path.exists(a.tree + ".complete"):
                os.remove(a.tree + ".complete")
    save(a.name or f"folders_{a.files // 1000}k", result)


if __name__ == "__main__":
    main()
