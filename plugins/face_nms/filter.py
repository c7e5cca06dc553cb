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
"""
import os

import numpy as np

from ..registry import register_dataset_filter
from .proxy_subset import check_ratio, per_identity_quota, random_subset
from .recordio_index import RecordIOError, load_filtered_index, read_index, write_idx


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


@register_dataset_filter("face_nms")
def face_nms_filter(cfg, dataset):
    """Keeps the records listed in ``config.face_nms['index']`` (written by ``face_nms select``)."""
    index = _options(cfg).get("index")
    if not index:
        raise ValueError("config.face_nms needs index='path/to/filtered.idx' (written by `python -m "
                         "plugins.face_nms select`)")
    return _restrict(cfg, dataset, load_filtered_index(index, cfg.rec), index)


@register_dataset_filter("random")
def random_filter(cfg, dataset):
    """A random per-identity sample: the counts of ``index`` per identity, or ``ratio``."""
    opts = _options(cfg)
    seed = int(opts.get("seed", 0))
    full = read_index(cfg.rec)
    if opts.get("index"):
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
    write_idx(path, full.keys[rows][order], full.offsets[rows][order])
    return _restrict(cfg, dataset, full.keys[rows][order], path)


__all__ = ["face_nms_filter", "random_filter", "RecordIOError"]
