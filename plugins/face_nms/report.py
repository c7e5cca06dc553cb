"""Summary of a selection: JSON beside the filtered index, and two PNG plots."""
import json
import os

import numpy as np

from .files import left_of_family, output_set
from .recordio_index import write_idx

LABEL_SAMPLE = 4096


def kept_histogram(labels, keep):
    """{faces kept: identities} over the identities present in ``labels`` (``keep``: rows or a mask)."""
    labels = np.asarray(labels, np.int64)
    sizes = np.bincount(labels)
    kept = np.bincount(labels[keep], minlength=len(sizes))[sizes > 0]
    values, counts = np.unique(kept, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def label_sample(keys, labels):
    """Keys and labels of up to LABEL_SAMPLE records spread over the kept ones (``keys``/``labels``:
    one per kept record): the training filter compares them with config.rec's labels, which the
    dataset digest (train.idx and the .rec size) alone would not catch after a relabelling."""
    pick = np.unique(np.linspace(0, len(keys) - 1, min(LABEL_SAMPLE, len(keys))).astype(np.int64))
    return {"keys": np.asarray(keys)[pick].tolist(), "labels": np.asarray(labels)[pick].tolist()}


def summary(sel, labels):
    labels = np.asarray(labels, np.int64)
    present = np.bincount(labels) > 0
    nn = _nn_cosines(sel)
    return {
        "method": sel.method, "order": sel.order, "threshold": sel.threshold,
        "kept": int(sel.kept), "total": int(sel.total), "kept_fraction": sel.fraction,
        "identities": int(present.sum()),
        "kept_per_identity_histogram": kept_histogram(labels, sel.keep),
        "nearest_kept_cosine_quantiles": {q: float(np.quantile(nn, float(q))) for q in ("0.5", "0.9", "0.99")}
        if len(nn) else {},
        "threshold_search": [[float(t), float(f)] for t, f in sel.search],
        "warnings": list(getattr(sel, "warnings", [])),
    }


def _nn_cosines(sel):
    """Cosine of each kept face to its nearest kept face of the same identity, where it has one."""
    return sel.nn_cos[np.isfinite(sel.nn_cos)] if sel.nn_cos is not None else np.zeros(0)


def _retention_by_size(labels, keep):
    sizes = np.bincount(labels)
    kept = np.bincount(labels[keep], minlength=len(sizes))
    present = sizes > 0
    s, k = sizes[present], kept[present]
    edges = np.unique(np.round(np.logspace(0, np.log10(s.max() + 1), 20)).astype(int))
    which = np.digitize(s, edges)
    xs, ys = [], []
    for b in np.unique(which):
        m = which == b
        xs.append(s[m].mean())
        ys.append(k[m].sum() / s[m].sum())
    return xs, ys


def index_summary(labels, keep, keys, dataset, **fields):
    """The summary the training filter reads beside a filtered index that is not a selection (an
    exclusion): ``fields``, the counts, the kept-per-identity histogram and, with ``dataset`` (the
    features' dataset provenance), the labels of a sample of kept records (``keys``: one per row)."""
    labels = np.asarray(labels, np.int64)
    info = dict(fields, kept=int(keep.sum()), total=int(len(labels)),
                kept_per_identity_histogram=kept_histogram(labels, keep))
    if dataset is not None:
        rows = np.flatnonzero(keep)
        info["dataset"] = dict(dataset, label_sample=label_sample(np.asarray(keys)[rows], labels[rows]))
    return info


def report_paths(idx_path):
    """The summary and plots written beside a filtered index."""
    stem = os.path.splitext(idx_path)[0]
    return [f"{stem}.json", f"{stem}_retention.png", f"{stem}_nn_cosine.png"]


def write_selection(idx_path, keys, offsets, sel, labels, dataset=None, page=None, write=None):
    """Writes the filtered index (``keys``/``offsets`` of the kept records) with its summary
    ``<stem>.json`` and plots ``<stem>_retention.png``, ``<stem>_nn_cosine.png``, as one set:
    an interruption leaves the previous set or the new one, never a mix. ``dataset``: the
    provenance of the dataset the features came from, recorded in the summary (the training
    filter compares it with ``config.rec``). ``page``: ``page(path, summary, plot_paths)`` writes
    ``<stem>.html`` (:mod:`.gallery`) into the same set. ``write``: ``write(path)`` writes the filtered set
    (a dataset's ``write_subset``, :mod:`.datasets`) instead of an .idx of ``keys``/``offsets``."""
    paths = [idx_path] + report_paths(idx_path) + ([os.path.splitext(idx_path)[0] + ".html"] if page else [])
    if dataset is not None:
        dataset = dict(dataset, label_sample=label_sample(keys, np.asarray(labels)[sel.keep]))
    with output_set(paths, ["", "", ".png", ".png", ".html"][:len(paths)], remove=left_of_family(idx_path, paths)) as tmps:
        if write is not None:
            write(tmps[0])
        else:
            write_idx(tmps[0], keys, offsets)
        info = _write_report(sel, labels, dataset, *tmps[1:4])
        if page is not None:
            page(tmps[4], info, tmps[2:4])
        return info


def _write_report(sel, labels, dataset, json_path, retention_path, nn_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, np.int64)
    info = summary(sel, labels)
    if dataset is not None:
        info["dataset"] = dataset
    with open(json_path, "w") as f:
        json.dump(info, f, indent=1)

    xs, ys = _retention_by_size(labels, sel.keep)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    retention_axes(ax, xs, ys, sel.fraction)
    _save(fig, retention_path)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    nn = _nn_cosines(sel)
    if len(nn):
        ax.hist(nn, bins=60, color="C0")
    if sel.threshold is not None:
        ax.axvline(sel.threshold, color="C3", ls="--", label=f"threshold {sel.threshold:.3f}")
        ax.legend()
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("cosine to the nearest kept face of its identity")
    ax.set_ylabel("kept faces")
    ax.set_title("kept faces' nearest neighbours (a sample of identities)", fontsize=10)
    _save(fig, nn_path)
    plt.close("all")
    return info


def _save(fig, path):
    # tight: every axis label inside the image, however long
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)


def retention_axes(ax, xs, ys, fraction):
    """Fraction kept against identity size (log axis, plain tick labels: 1, 2, 5, 10, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.semilogx(xs, ys, "o-")
    ax.axhline(fraction, color="gray", ls="--", label=f"overall {fraction:.1%}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("faces of the identity")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("retention by identity size")
