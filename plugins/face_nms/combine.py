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


def combine_indexes(rec_dir, paths, require=True):
    """(keys, offsets, summary) of the records of ``rec_dir`` listed by every index of ``paths``.

    Only train.idx and the headers of a sample of kept records are read (as the training filter
    reads a single index), so combining costs training no pass over the labels of every record. With
    ``require``, an index without a summary is refused (as the training filter refuses it)."""
    from .provenance import dataset_provenance
    from .files import reading_set
    from .filter import check_index_dataset
    from .recordio_index import RecordIOError, image_records, load_filtered_index, rec_paths, record_labels
    from .report import LABEL_SAMPLE
    if not paths:
        raise ValueError("no filtered index to combine: give at least one")
    _, all_keys, all_offsets = image_records(rec_dir)
    masks = []
    for path in paths:
        with reading_set(path):  # the index and its summary, of one set
            keys = load_filtered_index(path, rec_dir)
            check_index_dataset(path, rec_dir, keys, require=require)
        masks.append(np.isin(all_keys, keys))
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
    keys, offsets = all_keys[keep], all_offsets[keep]
    # the label sample the training filter compares with config.rec (as report.label_sample picks it)
    pick = np.unique(np.linspace(0, len(keys) - 1, min(LABEL_SAMPLE, len(keys))).astype(np.int64))
    labels = record_labels(rec_paths(rec_dir)[0], keys[pick], offsets[pick])
    dataset = dict(dataset_provenance(rec_dir), label_sample={"keys": keys[pick].tolist(),
                                                              "labels": labels.tolist()})
    summary = {"method": "combined (records in every index)", "sources": sources, "kept": int(keep.sum()),
               "total": int(len(keep)), "kept_fraction": float(keep.mean()), "removed": int((~keep).sum()),
               "dataset": dataset}
    return keys, offsets, summary


def combined_outputs(out):
    """The combined index and its summary beside it."""
    return [out, os.path.splitext(out)[0] + ".json"]


def write_combined(rec_dir, paths, out):
    """Writes the combined index ``out`` and its summary as one set; returns the summary."""
    keys, offsets, summary = combine_indexes(rec_dir, paths)
    write_combined_set(out, keys, offsets, summary)
    return summary


def write_combined_set(out, keys, offsets, summary):
    """The combined index ``out`` and its summary, as one set (an earlier index's plots and page go)."""
    from .files import left_of_family, output_set
    from .recordio_index import write_idx
    written = combined_outputs(out)
    with output_set(written, remove=left_of_family(out, written)) as (tmp_idx, tmp_json):
        write_idx(tmp_idx, keys, offsets)
        with open(tmp_json, "w") as f:
            json.dump(summary, f, indent=1)


def describe_sources(summary):
    """One line: what each index removed."""
    return "; ".join(f"{os.path.basename(s['index'])} removed {s['removed']:,} ({s['removed_by_it_alone']:,} by it "
                     f"alone)" for s in summary["sources"])
