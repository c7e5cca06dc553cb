"""Per-identity random samples: the proxy subset and the random baseline."""
import numpy as np


def per_identity_quota(sizes, ratio):
    """Faces to keep per identity: about ``ratio`` of each, at least one, summing to round(ratio * N).

    Largest-remainder apportionment; where the one-face minimum makes the total larger,
    the closest achievable total is kept.
    """
    check_ratio(ratio)
    sizes = np.asarray(sizes, np.int64)
    exact = ratio * sizes
    quota = np.where(sizes > 0, np.maximum(1, np.floor(exact).astype(np.int64)), 0)
    missing = int(round(ratio * sizes.sum())) - int(quota.sum())
    if missing > 0:
        room = np.flatnonzero(quota < sizes)
        frac = (exact - np.floor(exact))[room]
        quota[room[np.argsort(-frac, kind="stable")[:missing]]] += 1
    return quota


def check_ratio(ratio):
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")


def rank_within_identity(labels, keys):
    """Position of every row among the rows of its identity, ordered by ``keys`` then row index."""
    labels = np.asarray(labels)
    order = np.lexsort((np.arange(len(labels)), keys, labels))
    sizes = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def random_subset(labels, ratio=None, seed=0, quota=None):
    """Sorted rows of a deterministic per-identity random sample (``quota[label]`` faces each)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise ValueError("labels must be non-negative integer identity ids")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    labels = labels.astype(np.int64)
    if quota is None:
        quota = per_identity_quota(np.bincount(labels), ratio)
    keys = np.random.default_rng(seed).random(len(labels))
    return np.flatnonzero(rank_within_identity(labels, keys) < quota[labels])


def write_proxy_subset(out, ds, ratio, seed):
    """Writes the proxy subset of the dataset ``ds`` (a :mod:`.datasets` object) to ``out`` with its
    summary ``<stem>.json`` (the dataset's provenance, counts, a label sample: what the training filter
    checks), as one set. Returns the kept rows."""
    import json
    import os

    from .files import left_of_family, output_set
    from .report import index_summary
    rows = random_subset(ds.labels, ratio, seed)
    keep = np.zeros(len(ds), bool)
    keep[rows] = True
    info = index_summary(ds.labels, keep, ds.keys, ds.provenance(),
                         method="proxy-subset (random per identity)", ratio=ratio, seed=seed)
    # the plots and page of an earlier index of that name go with it
    written = [out, os.path.splitext(out)[0] + ".json"]
    with output_set(written, remove=left_of_family(out, written)) as (tmp_idx, tmp_json):
        ds.write_subset(tmp_idx, rows)
        with open(tmp_json, "w") as f:
            json.dump(info, f, indent=1)
    return rows
