"""Dataset filters: train the host's dataset on the records of a filtered set.

    config.dataset_filter = "face_nms"
    config.face_nms = dict(index="/train_tmp/WebFace42M/train_facenms60.idx")
    config.face_nms = dict(index="/train_tmp/WebFace42M_folder_facenms60.txt")   # an image folder

For a RecordIO ``config.rec`` the MXFaceDataset's index list (``imgidx``) is replaced by the kept
record keys and, with ``cfg.dali``, the DALI reader reads the same index file (``cfg.train_idx``);
for an image folder the ImageFolder's ``samples``, ``targets`` and ``imgs`` are reduced to the
listed files (:func:`.folder_dataset.restrict_image_folder`). The classes themselves are unchanged
and ``cfg.num_image`` follows the filtered size.

    config.face_nms = dict(index=[".../train_facenms60.idx", ".../train_noconflicts.idx",
                                  ".../train_no_overlap.idx"])   # the records in every one

trains on the intersection of several decisions (:mod:`.combine`), written once to
``cfg.output``/train_combined.idx (.txt for a folder) with its summary (the indexes, what each removed) for DALI.

    config.dataset_filter = "random"
    config.face_nms = dict(index=".../train_facenms60.idx", seed=0)   # same per-identity counts
    config.face_nms = dict(ratio=0.6, seed=0)                          # or a plain ratio

keeps a random per-identity sample instead (the baseline of the paper's comparison); its
index file is written to ``cfg.output``.

A filtered index must belong to ``config.rec``: every key at the same offset, and its summary
(``<index>.json``, written beside it by every face_nms command that writes an index) must match:
the dataset recorded there (train.idx digest, train.rec size, sampled-records digest and the
labels of a sample of kept records) or, for a summary without one, the per-identity counts it
reports, recomputed from the labels of ``config.rec``. An index without a summary is refused
unless ``config.face_nms = dict(index=..., trust_index=True)`` (an index written by other tools).
"""
import os

import numpy as np

from ..registry import register_dataset_filter
from .datasets import open_dataset
from .files import left_of_family, not_regular, output_set, reading_set
from .proxy_subset import check_ratio, per_identity_quota, random_subset
from .recordio_index import RecordIOError
from .summaries import read_summary


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
    """(path, checked summary or None) of the summary beside ``index`` (:func:`.summaries.read_summary`)."""
    return read_summary(index)


def check_index_dataset(index, rec_dir, keys, require=False):
    """Refuses a filtered set whose summary says it was selected from another dataset than ``rec_dir`` (a
    path or a :mod:`.datasets` object); ``keys``: the dataset keys of the records it lists. With
    ``require``, also a set without a summary (nothing to check it against)."""
    from .provenance import dataset_differences, note
    ds = open_dataset(rec_dir)
    rec_dir = ds.path
    path, info = _summary(index)
    if info is None:
        if require:
            raise RecordIOError(f"filtered index {index} has no summary {path} beside it, so nothing says it was "
                                f"selected from {rec_dir}: write the index with a face_nms command (select, "
                                f"proxy-subset, conflicts --drop, overlap --exclude), or set config.face_nms = "
                                f"dict(index=..., trust_index=True) to train on it unchecked")
        return
    other = f"filtered index {index} was not selected from {rec_dir}"
    if isinstance(info.get("dataset"), dict):
        recorded = dict(info["dataset"])
        sample = recorded.pop("label_sample", None)
        diff, informs = dataset_differences(recorded, rec_dir, ds.provenance())
        if diff:
            raise RecordIOError(f"{other} ({path}: {'; '.join(diff)}); select again from features of this dataset")
        if informs:
            note(informs, rec_dir)
        if isinstance(sample, dict):
            _check_label_sample(index, ds, keys, sample, other, path)
        return
    if not {"total", "kept", "kept_per_identity_histogram"} <= set(info):
        if require:
            raise RecordIOError(f"{path} (the summary of {index}) records neither the dataset nor the kept counts, so "
                                f"nothing says the index was selected from {rec_dir}: write the index again with a "
                                f"face_nms command, or set config.face_nms = dict(index=..., trust_index=True)")
        return
    from .report import kept_histogram
    hist = {str(v): c for v, c in kept_histogram(ds.labels, np.isin(ds.keys, keys)).items()}
    recorded = {str(int(k)): v for k, v in info["kept_per_identity_histogram"].items()}
    if info["total"] != len(ds) or info["kept"] != len(keys) or hist != recorded:
        raise RecordIOError(f"{other}: its labels differ ({path} reports {info['total']} faces, {info['kept']} kept, "
                            f"per-identity kept counts {_short(recorded, hist)}; {rec_dir} gives {len(ds)} faces, "
                            f"{len(keys)} kept, {_short(hist, recorded)}); select again from features of this dataset")


def _check_label_sample(index, ds, keys, sample, other, path):
    """The labels recorded for a sample of kept records, compared with the dataset's labels read now; ``keys``:
    the dataset keys the filtered set lists (checked to belong to ``ds``)."""
    from .provenance import exact
    want_keys = np.asarray(sample.get("keys", []), np.int64)
    want = list(sample.get("labels", []))
    if len(want_keys) != len(want) or not np.all(np.isin(want_keys, keys)):
        raise RecordIOError(f"{other}: {path} lists sampled keys that {index} does not; select again")
    order = np.argsort(ds.keys, kind="stable")
    now = ds.read_labels(order[np.searchsorted(ds.keys, want_keys, sorter=order)]).tolist()
    wrong = [i for i, (a, b) in enumerate(zip(want, now)) if a != b]
    if wrong:
        k = wrong[0]
        raise RecordIOError(f"{other}: its labels differ ({len(wrong)} of {len(want)} sampled records; key "
                            f"{int(want_keys[k])}: {exact(want[k])} in {path}, {exact(now[k])} in {ds.path}); select "
                            f"again from features of this dataset")


def _short(hist, other=None, k=4):
    """Up to ``k`` entries of a histogram, those that differ from ``other`` first."""
    items = sorted(hist.items(), key=lambda kv: int(kv[0]))
    if other is not None:
        items = [kv for kv in items if other.get(kv[0]) != kv[1]] + [kv for kv in items if other.get(kv[0]) == kv[1]]
    return "{" + ", ".join(f"{a}: {b}" for a, b in items[:k]) + (", ...}" if len(items) > k else "}")


@register_dataset_filter("face_nms")
def face_nms_filter(cfg, dataset):
    """Keeps the records listed in ``config.face_nms['index']`` (written by ``face_nms select``), or,
    given a list of indexes, the records listed in every one (:mod:`.combine`)."""
    opts = _options(cfg)
    index, trust = opts.get("index"), opts.get("trust_index", False)
    if not isinstance(trust, bool):
        raise ValueError(f"config.face_nms['trust_index'] must be True or False, got {trust!r}")
    if isinstance(index, (list, tuple)):
        return _combined(cfg, dataset, list(index), trust)
    if not index or not isinstance(index, (str, os.PathLike)):
        raise ValueError(f"config.face_nms needs index='path/to/filtered.idx' (written by `python -m "
                         f"plugins.face_nms select`) or a list of them, got {index!r}")
    ds = open_dataset(cfg.rec)
    with reading_set(index):  # the index and its summary, of one set
        rows = ds.subset_rows(index)
        check_index_dataset(index, ds, ds.keys[rows], require=not trust)
    return _restrict(cfg, dataset, ds, rows, index)


COMBINED = "train_combined"  # + .idx, or .txt for an image folder


def _combined(cfg, dataset, paths, trust=False):
    """The records in every index of ``paths``, written once (rank 0) to ``cfg.output``/train_combined.idx
    (.txt for a folder) with its summary, for DALI's reader (``cfg.train_idx``)."""
    from .combine import combine_indexes, combined_outputs, write_combined_set
    bad = [p for p in paths if not p or not isinstance(p, (str, os.PathLike))]
    if not paths or bad:
        raise ValueError(f"config.face_nms['index'] lists {paths!r}; give one or more paths of filtered .idx files")
    twice = next((p for i, p in enumerate(paths) if any(_same(p, q) for q in paths[:i])), None)
    if twice is not None:
        raise ValueError(f"config.face_nms['index'] lists {twice} twice; list each filtered index once")
    ds = open_dataset(cfg.rec)
    out_dir = cfg.get("output", None) or "."
    out = os.path.join(out_dir, COMBINED + ds.subset_ext)
    written = combined_outputs(out)
    clash = next((p for p in paths for w in written if _same(p, w) or
                  _same(os.path.splitext(p)[0] + ".json", w)), None)
    if clash is not None:
        raise ValueError(f"config.face_nms['index'] lists {clash}, which the combined index {out} (or its summary) "
                         f"would replace; move it out of config.output or give a different config.output")
    rows, summary = combine_indexes(ds, paths, require=not trust)
    if _rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        what = next((f"{p} is {w}" for p in written for w in [not_regular(p)] if w), None)
        if what:
            raise ValueError(f"{what}, not a regular file, where the face_nms filter writes the combined index "
                             f"(config.output); remove it or set another config.output")
        write_combined_set(out, ds, rows, summary)
    _barrier()
    return _restrict(cfg, dataset, ds, rows, out)


def _same(a, b):
    from .files import same_file
    return same_file(str(a), str(b))


def _rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@register_dataset_filter("random")
def random_filter(cfg, dataset):
    """A random per-identity sample: the counts of ``index`` per identity, or ``ratio``."""
    opts = _options(cfg)
    seed = opts.get("seed", 0)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"config.face_nms['seed'] must be a whole number >= 0, got {seed!r}")
    seed = int(seed)
    full = open_dataset(cfg.rec)
    if opts.get("index"):
        with reading_set(opts["index"]):
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
    what = not_regular(path)
    if what:
        raise ValueError(f"{path}, where the random filter writes its index (config.output), is {what}, not a regular "
                         f"file; remove it or set another config.output")
    with output_set([path], remove=left_of_family(path, [path])) as tmps:
        full.write_subset(tmps[0], rows)
    return _restrict(cfg, dataset, full, rows, path)


__all__ = ["face_nms_filter", "random_filter", "RecordIOError"]
