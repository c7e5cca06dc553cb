"""Several decisions on one dataset combined: the records present in every filtered index.

A selection (``select``), a conflicts drop (``conflicts --drop``) and an exclusion (``overlap
--exclude``) each write a filtered index of the same ``train.rec``; training, and DALI's reader,
take one. The combined index lists, in ``train.idx`` order, the image records listed by every one
of them (the intersection), each index first checked against the dataset as the training filter
checks one (same keys at the same offsets, the dataset recorded in its summary). Its summary
``<stem>.json`` names the indexes and how many records each removed, and carries the dataset's
provenance and a label sample, so the training filter and ``gallery`` accept it.
"""
import json
import os

import numpy as np


def combine_indexes(rec_dir, paths):
    """(keys, offsets, summary) of the records of ``rec_dir`` listed by every index of ``paths``."""
    from .extract import dataset_provenance
    from .filter import check_index_dataset
    from .recordio_index import RecordIOError, load_filtered_index, read_index
    from .report import index_summary
    if not paths:
        raise ValueError("no filtered index to combine: give at least one")
    full = read_index(rec_dir)
    masks = []
    for path in paths:
        keys = load_filtered_index(path, rec_dir)
        check_index_dataset(path, rec_dir, keys)
        masks.append(np.isin(full.keys, keys))
    keep = np.logical_and.reduce(masks)
    if not keep.any():
        raise RecordIOError(f"the filtered indexes {', '.join(paths)} have no record in common: their combination "
                            f"would train on nothing; check that each keeps the records it should")
    sources = []
    for i, (path, m) in enumerate(zip(paths, masks)):
        others = np.logical_and.reduce([x for j, x in enumerate(masks) if j != i]) if len(masks) > 1 else \
            np.ones(len(m), bool)
        sources.append({"index": os.path.abspath(path), "kept": int(m.sum()), "removed": int((~m).sum()),
                        "removed_by_it_alone": int((others & ~m).sum())})
    summary = index_summary(full.labels, keep, full.keys, dataset_provenance(rec_dir),
                            method="combined (records in every index)", sources=sources,
                            removed=int((~keep).sum()), identities=int((np.bincount(full.labels) > 0).sum()),
                            identities_kept=int(len(np.unique(full.labels[keep]))))
    summary["kept_fraction"] = float(keep.mean())
    return full.keys[keep], full.offsets[keep], summary


def combined_outputs(out):
    """The combined index and its summary beside it."""
    return [out, os.path.splitext(out)[0] + ".json"]


def write_combined(rec_dir, paths, out):
    """Writes the combined index ``out`` and its summary as one set; returns the summary."""
    from .files import output_set
    from .recordio_index import write_idx
    keys, offsets, summary = combine_indexes(rec_dir, paths)
    with output_set(combined_outputs(out)) as (tmp_idx, tmp_json):
        write_idx(tmp_idx, keys, offsets)
        with open(tmp_json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def describe_sources(summary):
    """One line: what each index removed."""
    return "; ".join(f"{os.path.basename(s['index'])} removed {s['removed']:,} ({s['removed_by_it_alone']:,} by it "
                     f"alone)" for s in summary["sources"])
