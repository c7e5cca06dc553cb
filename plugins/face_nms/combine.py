"""Several decisions on one dataset combined: the records present in every filtered index.

A selection (``select``), a conflicts drop (``conflicts --drop``) and an exclusion (``overlap
--exclude``) each write a filtered set of the same dataset (an ``.idx`` of ``train.rec``, or a
``.txt`` of an image folder's files); training, and DALI's reader, take one. The combined set lists,
in the dataset's order, the face records listed by every one
of them (the intersection), each index first checked against the dataset as the training filter
checks one (same keys at the same offsets, the dataset recorded in its summary). Its summary
``<stem>.json`` names the indexes and how many records each removed, and carries the dataset's
provenance and a label sample, so the training filter and ``gallery`` accept it.
"""
import json
import os

import numpy as np


def combine_indexes(rec_dir, paths, require=True):
    """(rows, summary): the rows of the dataset ``rec_dir`` (a path or a :mod:`.datasets` object)
    listed by every filtered set of ``paths``, in the dataset's order, and the summary of their
    combination.

    Only the dataset's listing and the labels of a sample of kept records are read (as the training
    filter reads a single index), so combining costs training no pass over the labels of every record.
    With ``require``, a set without a summary is refused (as the training filter refuses it)."""
    from .datasets import open_dataset
    from .files import reading_set
    from .filter import check_index_dataset
    from .recordio_index import RecordIOError
    from .report import LABEL_SAMPLE
    if not paths:
        raise ValueError("no filtered index to combine: give at least one")
    ds = open_dataset(rec_dir)
    masks = []
    for path in paths:
        with reading_set(path):  # the index and its summary, of one set
            rows = ds.subset_rows(path)
            check_index_dataset(path, ds, ds.keys[rows], require=require)
        mask = np.zeros(len(ds), bool)
        mask[rows] = True
        masks.append(mask)
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
    rows = np.flatnonzero(keep)
    # the label sample the training filter compares with config.rec (as report.label_sample picks it)
    pick = rows[np.unique(np.linspace(0, len(rows) - 1, min(LABEL_SAMPLE, len(rows))).astype(np.int64))]
    dataset = dict(ds.provenance(), label_sample={"keys": ds.keys[pick].tolist(),
                                                  "labels": ds.read_labels(pick).tolist()})
    summary = {"method": "combined (records in every index)", "sources": sources, "kept": int(keep.sum()),
               "total": int(len(keep)), "kept_fraction": float(keep.mean()), "removed": int((~keep).sum()),
               "dataset": dataset}
    return rows, summary


def combined_outputs(out):
    """The combined index and its summary beside it."""
    return [out, os.path.splitext(out)[0] + ".json"]


def write_combined(rec_dir, paths, out):
    """Writes the combined index ``out`` and its summary as one set; returns the summary."""
    from .datasets import open_dataset
    ds = open_dataset(rec_dir)
    rows, summary = combine_indexes(ds, paths)
    write_combined_set(out, ds, rows, summary)
    return summary


def write_combined_set(out, ds, rows, summary):
    """The combined set ``out`` of the dataset ``ds`` and its summary, as one set (an earlier index's
    plots and page go)."""
    from .files import left_of_family, output_set
    written = combined_outputs(out)
    with output_set(written, remove=left_of_family(out, written)) as (tmp_idx, tmp_json):
        ds.write_subset(tmp_idx, rows)
        with open(tmp_json, "w") as f:
            json.dump(summary, f, indent=1)


def describe_sources(summary):
    """One line: what each index removed."""
    return "; ".join(f"{os.path.basename(s['index'])} removed {s['removed']:,} ({s['removed_by_it_alone']:,} by it "
                     f"alone)" for s in summary["sources"])
