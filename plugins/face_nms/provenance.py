"""What identifies the inputs of a result: a dataset's records, a model's weights, an extraction's settings.

Recorded at extraction (meta.json ``provenance``) and compared by every later reader, so a result is
never combined with the records or the model of another run.

A dataset is identified by train.idx's digest (keys and offsets), train.rec's size, and a digest of
``RECORD_SAMPLE`` records spread over train.idx (their index lines and payloads: a few MB read, so a
rewrite of records in place, same sizes and same index, is seen). train.rec's modification time is
recorded too but only informs: a copy without ``-p`` changes it and nothing else, so when every
digest matches a changed mtime is accepted and said so (logged); when something else differs it is
named beside the rest (docs/provenance.md). Fields an older record lacks are not compared.
"""
import hashlib
import json
import logging
import os

import numpy as np

from .recordio_index import RecordIOError, read_record, rec_paths

LABEL_SAMPLE = 4096
RECORD_SAMPLE = 256  # records read for train_rec_sample_sha256: a few MB, well under a second at 42M records
INFORMS = ("train_rec_mtime_ns",)  # recorded and shown, never a reason to refuse by itself
_LINE_WINDOW = 8192  # bytes of train.idx read to find one line (an .idx line is two int64 numbers)


def file_sha256(path, what="file", block=4 << 20):
    """Hex SHA-256 of a file's content. A thread reads the next blocks while this one hashes (both
    release the GIL), so a cold file costs about max(read, hash), not their sum."""
    import queue
    import threading
    blocks, failed = queue.Queue(maxsize=4), []

    def reader(f):
        try:
            for data in iter(lambda: f.read(block), b""):
                blocks.put(data)
        except OSError as exc:
            failed.append(exc)
        finally:
            blocks.put(None)

    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            t = threading.Thread(target=reader, args=(f,), daemon=True)
            t.start()
            for data in iter(blocks.get, None):
                h.update(data)
            t.join()
        if failed:
            raise failed[0]
        return h.hexdigest()
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read ({exc.strerror}); check the path and its "
                         f"permissions") from None


def dataset_provenance(rec_dir, samples=RECORD_SAMPLE):
    """What identifies a dataset's records: train.idx's digest (streamed), train.rec's size, a digest of
    ``samples`` records spread over train.idx (:func:`record_sample_digest`) and train.rec's mtime."""
    rec, idx = rec_paths(rec_dir)
    st = os.stat(rec)
    return {"train_idx_sha256": file_sha256(idx, "index"), "train_rec_bytes": st.st_size,
            "train_rec_sample_sha256": record_sample_digest(rec, idx, samples),
            "train_rec_mtime_ns": st.st_mtime_ns}


def record_sample_digest(rec, idx, samples=RECORD_SAMPLE):
    """:func:`sampled_digest` of the train.idx lines at ``samples`` byte positions spread evenly over
    train.idx, each with the payload of the record it points to (joined as mxnet reads it): no parse
    of train.idx, one short read of it and one of train.rec per sample."""
    size = os.path.getsize(idx)
    try:
        with open(idx, "rb") as fi, open(rec, "rb") as fr:
            def read(i):
                line = _line_at(fi, i, size, idx)
                key, offset = line.split()
                return line + read_record(fr, int(offset), rec, int(key))
            return sampled_digest(read, size, samples)
    except OSError as exc:
        raise RecordIOError(f"{rec} or {idx} cannot be read ({exc.strerror}); check the files and their "
                            f"permissions") from None


def _line_at(f, pos, size, idx):
    """The first whole line of ``f`` that starts at or after byte ``pos`` (the first line of the file
    when ``pos`` falls in the last one)."""
    start = pos
    if pos:
        f.seek(pos - 1)
        block = f.read(_LINE_WINDOW)
        cut = block.find(b"\n")
        start = pos + cut if cut >= 0 and pos + cut < size else 0
    f.seek(start)
    line = f.read(_LINE_WINDOW).split(b"\n", 1)[0]
    fields = line.split()
    if len(fields) != 2 or not all(x.lstrip(b"-").isdigit() for x in fields):
        raise RecordIOError(f"{idx}: the line at byte {start} ({line[:40].decode('utf-8', 'replace')!r}) is not "
                            f"'key<TAB>offset' with integers: the file is not an MXNet index file; restore the "
                            f"train.idx packed with this train.rec")
    return line.strip()


def dataset_differences(recorded, rec_dir, now=None):
    """(refusing, informing): ``name (then, now)`` of the recorded dataset fields that differ from
    ``rec_dir`` now. Only fields present in both are compared (an older record lacks some); a
    field of :data:`INFORMS` alone never refuses, and is named among the refusing ones when
    something else differs."""
    if now is None:
        from .datasets import open_dataset
        now = open_dataset(rec_dir).provenance()
    if not isinstance(recorded, dict):
        return differences(recorded, now, "dataset."), []
    both = [k for k in recorded if k in now]
    if recorded and not both:  # another kind of dataset (a RecordIO folder then, an image folder now, ...)
        return differences(recorded, now, "dataset."), []
    refusing = differences({k: recorded[k] for k in both if k not in INFORMS},
                           {k: now[k] for k in both if k not in INFORMS})
    informs = [f"{k} ({_when(recorded[k])} then, {_when(now[k])} now)" for k in both
               if k in INFORMS and recorded[k] != now[k]]
    return (refusing + informs, []) if refusing else ([], informs)


def _when(ns):
    """An mtime in ns as a UTC time, to the microsecond."""
    import datetime
    if not isinstance(ns, int) or isinstance(ns, bool):
        return json.dumps(ns) if isinstance(ns, (str, float, list)) else repr(ns)
    try:
        return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    except (OverflowError, OSError, ValueError):
        return str(ns)


def provenance_differences(old, new, rec_dir=None, log=None):
    """``differences`` of two provenance records, their ``dataset`` compared by :func:`dataset_differences`
    (``new["dataset"]`` being the dataset now); a dataset that differs only by :data:`INFORMS` is
    accepted and ``log`` (or the ``face_nms`` logger) told why."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return differences(old, new)
    rest = differences({k: v for k, v in old.items() if k != "dataset"},
                       {k: v for k, v in new.items() if k != "dataset"})
    if "dataset" not in old or "dataset" not in new:
        return rest + differences(old.get("dataset"), new.get("dataset"), "dataset.")
    refusing, informs = dataset_differences(old["dataset"], rec_dir, new["dataset"])
    if informs and not refusing and not rest:
        note(informs, rec_dir, log)
    return rest + [f"dataset.{d}" for d in refusing]


def note(informs, rec_dir, log=None):
    """Says that a dataset is taken for the recorded one although its mtime changed."""
    line = (f"{rec_dir}: {'; '.join(informs)}, but train.idx, train.rec's size and its sampled records match "
            f"the recorded ones: taken for the same dataset (a copy that did not keep the mtime)")
    (log or logging.getLogger("face_nms").warning)(line)


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
        if isinstance(v, str) and len(v) > 16:
            return v[:12] + "..."
        return json.dumps(v) if isinstance(v, (str, bool, int, float, list)) else repr(v)
    return [f"{prefix.rstrip('.') or 'provenance'} ({show(old)} then, {show(new)} now)"]


def exact(v):
    """A label as it is stored: an integer as one, anything else by its repr (3 and 3.0 differ)."""
    if isinstance(v, (bool, np.bool_)):
        return repr(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return repr(v)


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
        diff, informs = dataset_differences(recorded, rec_dir, ds.provenance())
        if diff:
            raise ValueError(f"{other}: {'; '.join(diff)}; extract features of this dataset")
        if informs:
            note(informs, rec_dir)
    rec_keys = ds.keys
    if len(rec_keys) != len(keys):
        raise ValueError(f"{other}: its {len(keys)} rows do not match the {len(rec_keys)} face records of "
                         f"{rec_dir}; extract features of this dataset")
    if not np.array_equal(rec_keys, keys):
        k = int(np.flatnonzero(rec_keys != keys)[0])
        raise ValueError(f"{other}: row {k} is record {int(keys[k])} in keys.npy but {ds.record_name(k)} in the "
                         f"dataset (the rows are other records or in another order); extract features of this dataset")
    rows = np.arange(len(keys))
    if recorded is not None and len(rows) > LABEL_SAMPLE:
        rows = np.unique(np.linspace(0, len(keys) - 1, LABEL_SAMPLE).astype(np.int64))
    now = ds.read_labels(rows)
    wrong = np.flatnonzero(now != labels[rows])
    if len(wrong):
        k = int(rows[wrong[0]])
        raise ValueError(f"{other}: labels differ for {len(wrong)} of {len(rows)} rows compared (record "
                         f"{ds.record_name(k)}: {exact(labels[k])} in labels.npy, {exact(now[wrong[0]])} in the dataset); "
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
