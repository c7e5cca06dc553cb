"""Dataset filters: train the host's MXFaceDataset on the records of a filtered index.

    config.dataset_filter = "face_nms"
    config.face_nms = dict(index="/train_tmp/WebFace42M/train_facenms60.idx")

The dataset's index list (``imgidx``) is replaced by the kept record keys; the class itself
is unchanged. ``cfg.num_image`` follows the filtered size and, with ``cfg.dali``, the DALI
reader reads the same index file (``cfg.train_idx``).

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
from .files import not_regular, output_set, reading_set
from .proxy_subset import check_ratio, per_identity_quota, random_subset
from .recordio_index import RecordIOError, load_filtered_index, read_idx, read_index, rec_paths, record_labels, write_idx


def _options(cfg):
    opts = cfg.get("face_nms", None)
    if not isinstance(opts, dict):
        raise ValueError(f"config.dataset_filter = {cfg.dataset_filter!r} needs config.face_nms = "
                         f"dict(index='.../train_facenms60.idx'), got {opts!r}")
    return opts


def _restrict(cfg, dataset, keys, index_path):
    if not hasattr(dataset, "imgidx"):
        raise TypeError(f"config.dataset_filter = {cfg.dataset_filter!r} filters an MXNet RecordIO dataset "
                        f"(train.rec + train.idx in config.rec = {cfg.rec!r}); got {type(dataset).__name__}")
    dataset.imgidx = np.asarray(keys, dtype=np.int64)
    cfg.train_idx = index_path
    return dataset


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
    """Refuses a filtered index whose summary says it was selected from another dataset than ``rec_dir``."""
    from .extract import _differences, dataset_provenance
    path, info = _summary(index)
    if info is None:
        return
    other = f"filtered index {index} was not selected from {rec_dir}"
    if isinstance(info.get("dataset"), dict):
        recorded = dict(info["dataset"])
        sample = recorded.pop("label_sample", None)
        diff = _differences(recorded, dataset_provenance(rec_dir))
        if diff:
            raise RecordIOError(f"{other} ({path}: {'; '.join(diff)}); select again from features of this dataset")
        if isinstance(sample, dict):
            _check_label_sample(index, rec_dir, sample, other, path)
        return
    if not {"total", "kept", "kept_per_identity_histogram"} <= set(info):
        return
    from .report import kept_histogram
    full = read_index(rec_dir)
    hist = {str(v): c for v, c in kept_histogram(full.labels, np.isin(full.keys, keys)).items()}
    recorded = {str(k): int(v) for k, v in info["kept_per_identity_histogram"].items()}
    if info["total"] != len(full) or info["kept"] != len(keys) or hist != recorded:
        raise RecordIOError(f"{other}: its labels differ ({path} reports {info['total']} faces and per-identity "
                            f"kept counts {_short(recorded)}; {rec_dir} gives {len(full)} faces and "
                            f"{_short(hist)}); select again from features of this dataset")


def _check_label_sample(index, rec_dir, sample, other, path):
    rec, _ = rec_paths(rec_dir)
    idx_keys, idx_offsets = read_idx(index)
    want_keys = np.asarray(sample.get("keys", []), np.int64)
    want = np.asarray(sample.get("labels", []), np.int64)
    pos = np.searchsorted(idx_keys, want_keys, sorter=np.argsort(idx_keys, kind="stable"))
    order = np.argsort(idx_keys, kind="stable")
    if len(want_keys) != len(want) or np.any(pos >= len(idx_keys)) or \
            not np.array_equal(idx_keys[order[np.minimum(pos, len(idx_keys) - 1)]], want_keys):
        raise RecordIOError(f"{other}: {path} lists sampled keys that {index} does not; select again")
    now = record_labels(rec, want_keys, idx_offsets[order[pos]])
    wrong = np.flatnonzero(now != want)
    if len(wrong):
        k = wrong[0]
        raise RecordIOError(f"{other}: its labels differ ({len(wrong)} of {len(want)} sampled records; key "
                            f"{int(want_keys[k])}: {int(want[k])} in {path}, {int(now[k])} in {rec}); select again "
                            f"from features of this dataset")


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
    with reading_set(index):  # the index and its summary, of one set
        keys = load_filtered_index(index, cfg.rec)
        check_index_dataset(index, cfg.rec, keys)
    return _restrict(cfg, dataset, keys, index)


@register_dataset_filter("random")
def random_filter(cfg, dataset):
    """A random per-identity sample: the counts of ``index`` per identity, or ``ratio``."""
    opts = _options(cfg)
    seed = int(opts.get("seed", 0))
    full = read_index(cfg.rec)
    if opts.get("index"):
        with reading_set(opts["index"]):
            kept = load_filtered_index(opts["index"], cfg.rec)
        quota = np.bincount(full.labels[np.isin(full.keys, kept)], minlength=full.num_classes)
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
    path = os.path.join(out_dir, f"train_random_seed{seed}.idx")
    order = np.argsort(full.keys[rows], kind="stable")
    what = not_regular(path)
    if what:
        raise ValueError(f"{path}, where the random filter writes its index (config.output), is {what}, not a regular "
                         f"file; remove it or set another config.output")
    stem = os.path.splitext(path)[0]
    with output_set([path], remove=[f"{stem}.json", f"{stem}_retention.png", f"{stem}_nn_cosine.png",
                                    f"{stem}.html"]) as tmps:
        write_idx(tmps[0], full.keys[rows][order], full.offsets[rows][order])
    return _restrict(cfg, dataset, full.keys[rows][order], path)


__all__ = ["face_nms_filter", "random_filter", "RecordIOError"]
