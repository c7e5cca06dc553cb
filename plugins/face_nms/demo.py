"""A small RecordIO face set with planted near-duplicate bursts, and a run of the whole pipeline on it.

The images are synthetic (each identity a smooth random pattern, each face a shifted, re-lit,
noisy view of it; a burst is one face repeated with tiny changes, as web-crawled datasets
repeat video frames). A seeded random small CNN stands in for the proxy model: it maps
near-duplicate images to near-identical features, which is what NMS removes.
"""
import os
import tempfile
import time

import numpy as np
import torch


def synthetic_faces(n_ids=40, seed=0, size=112, burst_every=3, burst_len=8):
    """(images uint8 N x size x size x 3 RGB, labels, burst flags): identities of 3..20 faces."""
    import cv2
    rng = np.random.default_rng(seed)
    images, labels, burst = [], [], []
    for k in range(n_ids):
        base = cv2.resize(rng.random((8, 8, 3)).astype(np.float32), (size + 16, size + 16),
                          interpolation=cv2.INTER_CUBIC)
        n_faces = int(rng.integers(3, 12))
        for _ in range(n_faces):
            dx, dy = rng.integers(0, 16, 2)
            view = base[dy:dy + size, dx:dx + size] * rng.uniform(0.7, 1.3) + 0.08 * rng.standard_normal((size, size, 3))
            images.append(_to_uint8(view))
            labels.append(k)
            burst.append(False)
        if k % burst_every == 0:
            frame = view
            for _ in range(burst_len):
                images.append(_to_uint8(frame + 0.01 * rng.standard_normal(frame.shape)))
                labels.append(k)
                burst.append(True)
    return np.stack(images), np.array(labels), np.array(burst)


def _to_uint8(view):
    return np.clip(view * 255, 0, 255).astype(np.uint8)


def write_recordio(rec_dir, images, labels, layout="insightface", shuffle_seed=None, quality=95):
    """Writes train.rec/train.idx with mxnet's own RecordIO writer, in either arcface_torch layout.

    insightface: record 0 is a header (flag 2, label (N+1, N+1+num_ids)), images are records
    1..N sorted by identity, then one record per identity. im2rec: keys 0..N-1, images only,
    optionally shuffled (as im2rec packs WebFace42M). Returns the record key of each image.
    """
    import cv2
    from ..compat import import_mxnet
    mx = import_mxnet()
    os.makedirs(rec_dir, exist_ok=True)
    rec, idx = os.path.join(rec_dir, "train.rec"), os.path.join(rec_dir, "train.idx")
    writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    n = len(images)
    order = np.arange(n)
    if layout == "im2rec" and shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)
    elif layout == "insightface":
        order = np.argsort(labels, kind="stable")
    keys = np.empty(n, np.int64)

    def jpeg(img):
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        return buf.tobytes()

    if layout == "insightface":
        ids = np.unique(labels)
        writer.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(2, [n + 1, n + 1 + len(ids)], 0, 0), b""))
        for key, i in enumerate(order, start=1):
            writer.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(labels[i]), key, 0), jpeg(images[i])))
            keys[i] = key
        sorted_labels = labels[order]
        for j, lab in enumerate(ids):
            rows = np.flatnonzero(sorted_labels == lab)
            header = mx.recordio.IRHeader(2, [int(rows[0]) + 1, int(rows[-1]) + 2], 0, 0)
            writer.write_idx(n + 1 + j, mx.recordio.pack(header, b""))
    elif layout == "im2rec":
        for key, i in enumerate(order):
            # im2rec writes the label as a one-element label array (flag 1) when given a .lst
            header = mx.recordio.IRHeader(0, float(labels[i]), key, 0)
            writer.write_idx(key, mx.recordio.pack(header, jpeg(images[i])))
            keys[i] = key
    else:
        raise ValueError(f"layout must be 'insightface' or 'im2rec', got {layout!r}")
    writer.close()
    return keys


class TinyNet(torch.nn.Module):
    """A small CNN mapping 3x112x112 faces to 128-d features (stands in for a proxy model)."""

    def __init__(self, dim=128, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, stride=4), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 49, dim))
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(max(1, p[0].numel()))))

    def forward(self, x):
        return self.convs(x)


def run_demo(work_dir=None, ratio=0.6, n_ids=40, seed=0, out=print):
    """Generates the set, extracts, selects at ``ratio`` and prints what was kept."""
    from .conflicts import find_identity_conflicts
    from .extract import extract_features
    from .features import load_features
    from .models import TorchModel
    from .gallery import selection_writer
    from .recordio_index import image_records
    from .report import write_selection
    from .select import select_core_set

    t0 = time.time()
    work_dir = work_dir or tempfile.mkdtemp(prefix="face_nms_demo_")
    rec_dir = os.path.join(work_dir, "faces")
    images, labels, burst = synthetic_faces(n_ids, seed)
    # one person under two labels: every other face of identity 3 becomes identity n_ids
    dup = min(3, n_ids - 1)
    labels[np.flatnonzero(labels == dup)[::2]] = n_ids
    keys = write_recordio(rec_dir, images, labels, "im2rec", shuffle_seed=seed)
    out(f"wrote {len(images)} faces of {n_ids + 1} identities ({int(burst.sum())} in near-duplicate bursts; "
        f"identity {dup} also under label {n_ids}) to {rec_dir} (im2rec layout, shuffled)")
    torch.manual_seed(seed)
    feat_dir = os.path.join(work_dir, "features")
    extract_features(rec_dir, feat_dir, TorchModel(TinyNet(seed=seed), "cpu"), batch_size=64, workers=0,
                     progress=False)
    feats, flabels, fkeys, _ = load_features(feat_dir, rec_dir)
    sel = select_core_set(feats, flabels, ratio=ratio)
    _, rec_keys, rec_offsets = image_records(rec_dir)
    idx_path = os.path.join(work_dir, f"train_facenms{int(round(ratio * 100))}.idx")
    page = selection_writer(rec_dir, feats, flabels, rec_keys, rec_offsets, sel, idx_path, seed=seed)
    write_selection(idx_path, rec_keys[sel.keep], rec_offsets[sel.keep], sel, flabels, page=page)
    kept_keys = set(fkeys[sel.keep].tolist())
    is_burst = dict(zip(keys.tolist(), burst.tolist()))
    lab_of = dict(zip(keys.tolist(), labels.tolist()))
    burst_kept = sum(1 for k in kept_keys if is_burst[k])
    out(f"threshold {sel.threshold:.4f}: kept {sel.kept} of {sel.total} faces ({sel.fraction:.1%})")
    out(f"burst frames kept: {burst_kept} of {int(burst.sum())}; other faces kept: "
        f"{sel.kept - burst_kept} of {int((~burst).sum())}")
    for k in range(min(n_ids, 6)):
        rows = [key for key in lab_of if lab_of[key] == k]
        b = sum(is_burst[key] for key in rows)
        kept = [key for key in rows if key in kept_keys]
        out(f"  identity {k}: {len(rows)} faces ({b} burst frames) -> kept {len(kept)} "
            f"({sum(is_burst[key] for key in kept)} burst frames)")
    found = find_identity_conflicts(feats, flabels)
    planted = [c for a, b, c in found if (a, b) == (dup, n_ids)]
    out(f"conflicts: {len(found)} pair(s) at the default threshold; the planted duplicate ({dup}, {n_ids}) is "
        + (f"found at cosine {planted[0]:.4f}" if planted else "NOT found"))
    out(f"filtered index: {idx_path} (+ .json summary, .png plots and the .html page: open it in a browser); "
        f"{time.time() - t0:.1f} s")
    return sel, idx_path
