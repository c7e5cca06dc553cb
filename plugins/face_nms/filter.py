"""Dataset filters: train the host's dataset on the records of a filtered set.

    config.dataset_filter = "face_nms"
    config.face_nms = dict(index="/train_tmp/WebFace42M/train_facenms60.idx")
    config.face_nms = dict(index="/train_tmp/WebFace42M_folder_facenms60.txt")   # an image folder

For a RecordIO ``config.rec`` the MXFaceDataset's index list (``imgidx``) is replaced by the kept
record keys and, with ``cfg.dali``, the DALI reader reads the same index file (``cfg.train_idx``);
for an image folder the ImageFolder's ``samples``, ``targets`` and ``imgs`` are reduced to the
listed files (:func:`.folder_dataset.restrict_image_folder`). The classes themselves are unchanged
and ``cfg.num_image`` follows the filtered size.

    config.dataset_filter = "random"
    config.face_nms = dict(index=".../train_facenms60.idx", seed=0)   # same per-identity counts
    config.face_nms = dict(ratio=0.6, seed=0)                          # or a plain ratio

keeps a random per-identity sample instead (the baseline of the paper's comparison); its
index file is written to ``cfg.output``.

A filtered index must belong to ``config.rec``: every key at the same offset, and, where
``select`` wrote its summary (``<index>.json``) beside it, the dataset recorded there (train.idx
digest, train.rec size and the labels of a sample of kept records) or, for a summary without
one, the per-identity counts it reports, recomputed from the labels of ``config.rec``.
"""
import json
import os

import numpy as np

from ..registry import register_dataset_filter
from .proxy_subset import check_ratio, per_identity_quota, random_subset
from .datasets import open_dataset
from .recordio_index import RecordIOError


def _options(cfg):
    opts = cfg.get("face_nms", None)
    if not isinstance(opts, dict):
        raise ValueError(f"config.dataset_filter = {cfg.dataset_filter!r} needs config.face_nms = "
                         f"dict(index='.../train_facenms60.idx'), got {opts!r}")
    return opts


def _restrict(cfg, dataset, ds, rows, index_path):
    try:
        return ds.restrict(dataset, rows, cfg, index_path)
    except TypeError as exc:
        raise TypeError(f"config.dataset_filter = {cfg.dataset_filter!r} (config.rec = {cfg.rec!r}): {exc}") from None


def _summary(index):
    path = os.path.splitext(index)[0] + ".json"
    if not os.path.exists(path):
        return path, None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} (the summary of {index}) cannot be read ({exc}); select again") from None
    return path, info if isinstance(info, dict) else {}


def check_index_dataset(index, rec_dir, keys):
    """Refuses a filtered set whose summary says it was selected from another dataset than ``rec_dir`` (a
    path or a :mod:`.datasets` object); ``keys``: the dataset keys of the records it lists."""
    from .provenance import differences
    ds = open_dataset(rec_dir)
    rec_dir = ds.path
    path, info = _summary(index)
    if info is None:
        return
    other = f"filtered index {index} was not selected from {rec_dir}"
    if isinstance(info.get("dataset"), dict):
        recorded = dict(info["dataset"])
        sample = recorded.pop("label_sample", None)
        diff = differences(recorded, ds.provenance())
        if diff:
            raise RecordIOError(f"{other} ({path}: {'; '.join(diff)}); select again from features of this dataset")
        if isinstance(sample, dict):
            _check_label_sample(index, ds, keys, sample, other, path)
        return
    if not {"total", "kept", "kept_per_identity_histogram"} <= set(info):
        return
    from .report import kept_histogram
    hist = {str(v): c for v, c in kept_histogram(ds.labels, np.isin(ds.keys, keys)).items()}
    recorded = {str(k): int(v) for k, v in info["kept_per_identity_histogram"].items()}
    if info["total"] != len(ds) or info["kept"] != len(keys) or hist != recorded:
        raise RecordIOError(f"{other}: its labels differ ({path} reports {info['total']} faces and per-identity "
                            f"kept counts {_short(recorded)}; {rec_dir} gives {len(ds)} faces and "
                            f"{_short(hist)}); select again from features of this dataset")


def _check_label_sample(index, ds, keys, sample, other, path):
    """The labels recorded for a sample of kept records, compared with the dataset's labels read now; ``keys``:
    the dataset keys the filtered set lists (checked to belong to ``ds``)."""
    want_keys = np.asarray(sample.get("keys", []), np.int64)
    want = np.asarray(sample.get("labels", []), np.int64)
    if len(want_keys) != len(want) or not np.all(np.isin(want_keys, keys)):
        raise RecordIOError(f"{other}: {path} lists sampled keys that {index} does not; select again")
    order = np.argsort(ds.keys, kind="stable")
    now = ds.read_labels(order[np.searchsorted(ds.keys, want_keys, sorter=order)])
    wrong = np.flatnonzero(now != want)
    if len(wrong):
        k = wrong[0]
        raise RecordIOError(f"{other}: its labels differ ({len(wrong)} of {len(want)} sampled records; key "
                            f"{int(want_keys[k])}: {int(want[k])} in {path}, {int(now[k])} in {ds.path}); select "
                            f"again from features of this dataset")


def _short(hist, k=4):
    items = sorted(hist.items(), key=lambda kv: int(kv[0]))
    return "{" + ", ".join(f"{a}: {b}" for a, b in items[:k]) + (", ...}" if len(items) > k else "}")


@register_dataset_filter("face_nms")
def face_nms_filter(cfg, dataset):
    """Keeps the records listed in ``config.face_nms['index']`` (written by ``face_nms select``)."""
    index = _options(cfg).get("index")
    if not index:
        raise ValueError("config.face_nms needs index='path/to/filtered.idx' (written by `python -m "
                         "plugins.face_nms select`)")
    ds = open_dataset(cfg.rec)
    rows = ds.subset_rows(index)
    check_index_dataset(index, ds, ds.keys[rows])
    return _restrict(cfg, dataset, ds, rows, index)


@register_dataset_filter("random")
def random_filter(cfg, dataset):
    """A random per-identity sample: the counts of ``index`` per identity, or ``ratio``."""
    opts = _options(cfg)
    seed = int(opts.get("seed", 0))
    full = open_dataset(cfg.rec)
    if opts.get("index"):
        kept = full.subset_rows(opts["index"])
        quota = np.bincount(full.labels[kept], minlength=full.num_classes)
        rows = random_subset(full.labels, seed=seed, quota=quota)
    elif opts.get("ratio") is not None:
        check_ratio(opts["ratio"])
        rows = random_subset(full.labels, seed=seed, quota=per_identity_quota(np.bincount(full.labels),
                                                                              opts["ratio"]))
    else:
        raise ValueError("config.face_nms for the random filter needs index= (match its per-identity counts) "
                         "or ratio=")
    out_dir = cfg.get("output", None) or "."
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train_random_seed{seed}{full.subset_ext}")
    rows = rows[np.argsort(full.keys[rows], kind="stable")]
    full.write_subset(path, rows)
    return _restrict(cfg, dataset, full, rows, path)


__all__ = ["face_nms_filter", "random_filter", "RecordIOError"]
