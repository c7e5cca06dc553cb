"""What identifies the inputs of a result: a dataset's records, a model's weights, an extraction's settings.

Recorded at extraction (meta.json ``provenance``) and compared by every later reader, so a result is
never combined with the records or the model of another run.
"""
import hashlib
import json
import os

import numpy as np

from .recordio_index import rec_paths

LABEL_SAMPLE = 4096


def file_sha256(path, what="file"):
    """Hex SHA-256 of a file's content, read in blocks."""
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read ({exc.strerror}); check the path and its "
                         f"permissions") from None


def dataset_provenance(rec_dir):
    """What identifies a dataset's records: train.idx content (streamed digest) and train.rec size."""
    rec, idx = rec_paths(rec_dir)
    return {"train_idx_sha256": file_sha256(idx, "index"), "train_rec_bytes": os.path.getsize(rec)}


def model_provenance(model):
    if hasattr(model, "provenance"):
        return model.provenance()
    return {"name": getattr(model, "name", type(model).__name__)}


def differences(old, new, prefix=""):
    """``name (old then, new now)`` for every leaf that differs between two provenance records."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    if old == new:
        return []

    def show(v):
        if v is None or isinstance(v, dict):
            return "not recorded" if v is None else "recorded"
        return v[:12] + "..." if isinstance(v, str) and len(v) > 16 else json.dumps(v)
    return [f"{prefix.rstrip('.') or 'provenance'} ({show(old)} then, {show(new)} now)"]


def check_dataset(feature_dir, meta, rec_dir, labels, keys):
    """Refuses features whose rows are not this dataset's face records with these labels.

    ``rec_dir``: the dataset's path or a :mod:`.datasets` object. The dataset provenance recorded at
    extraction is compared first (for RecordIO it fixes keys and offsets, for a folder the file list);
    labels are then compared on a sample of rows, or on every row when no provenance was recorded.
    """
    from .datasets import open_dataset
    ds = open_dataset(rec_dir)
    rec_dir = ds.path
    recorded = (meta.get("provenance") or {}).get("dataset")
    other = f"features in {feature_dir} were not extracted from {rec_dir}"
    if recorded is not None:
        diff = differences(recorded, ds.provenance())
        if diff:
            raise ValueError(f"{other}: {'; '.join(diff)}; extract features of this dataset")
    rec_keys = ds.keys
    if not np.array_equal(rec_keys, keys):
        raise ValueError(f"{other}: its {len(keys)} rows do not match the {len(rec_keys)} face records of "
                         f"{rec_dir}; extract features of this dataset")
    rows = np.arange(len(keys))
    if recorded is not None and len(rows) > LABEL_SAMPLE:
        rows = np.unique(np.linspace(0, len(keys) - 1, LABEL_SAMPLE).astype(np.int64))
    now = ds.read_labels(rows)
    wrong = np.flatnonzero(now != labels[rows])
    if len(wrong):
        k = int(rows[wrong[0]])
        raise ValueError(f"{other}: labels differ for {len(wrong)} of {len(rows)} rows compared (record "
                         f"{ds.record_name(k)}: {int(labels[k])} in labels.npy, {now[wrong[0]]:g} in the dataset); "
                         f"extract features of this dataset")


def sampled_digest(read, count, samples=256):
    """Hex SHA-256 of ``samples`` records spread evenly over ``count`` (``read(i)`` gives record i's bytes).

    A content check for a dataset whose index and size are unchanged but whose records were rewritten;
    it reads a few MB whatever the dataset's size.
    """
    h = hashlib.sha256()
    rows = np.unique(np.linspace(0, count - 1, min(samples, count)).astype(np.int64)) if count else []
    for i in rows:
        data = read(int(i))
        h.update(np.array([i, len(data)], "<i8").tobytes())
        h.update(data)
    return h.hexdigest()
