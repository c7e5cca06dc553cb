"""Reading a finished extraction: features.npy (memory-mapped), labels, keys and meta.json, checked."""
import json
import os

import numpy as np

from .provenance import check_dataset

META_KEYS = ("model", "count", "dimension", "flip")


def _load_meta(meta_path):
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not JSON ({exc}); extract the features again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} misses {', '.join(missing)}: it was not written by extract; extract the "
                         f"features again")
    return meta


def load_features(feature_dir, rec_dir=None):
    """(features memmap, labels, keys, meta) of an extraction, checked against ``rec_dir`` when given."""
    path = os.path.join(feature_dir, "features.npy")
    meta_path = os.path.join(feature_dir, "meta.json")
    if not os.path.exists(path) or not os.path.exists(meta_path):
        hint = " (the extraction is unfinished: run extract again to complete it)" \
            if os.path.exists(path + ".partial") else "; give the --out folder of a finished extract run"
        raise FileNotFoundError(f"{feature_dir} holds no finished extraction (features.npy + meta.json){hint}")
    meta = _load_meta(meta_path)
    feats = np.load(path, mmap_mode="r")
    labels = np.load(os.path.join(feature_dir, "labels.npy"))
    keys = np.load(os.path.join(feature_dir, "keys.npy"))
    if not (len(feats) == len(labels) == len(keys) == meta["count"]):
        raise ValueError(f"{feature_dir}: features.npy has {len(feats)} rows, labels.npy {len(labels)}, "
                         f"keys.npy {len(keys)}, meta.json {meta['count']}; the folder is inconsistent, extract again")
    if rec_dir is not None:
        check_dataset(feature_dir, meta, rec_dir, labels, keys)
    return feats, labels, keys, meta
