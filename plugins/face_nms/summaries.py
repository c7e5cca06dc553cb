"""Reading the summary beside a filtered index (``<stem>.json``), checked field by field.

Every reader of a summary (the training filter, ``gallery``, ``stats --index``) goes through
:func:`read_summary`: a file that is not a JSON object, or a known field of the wrong type or out
of range, is one line naming the file and the field. Unknown fields are left alone.
"""
import json
import math
import os
import re

from .recordio_index import LABEL_LIMIT, RecordIOError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_INT64 = 2 ** 63


def summary_path(index):
    return os.path.splitext(index)[0] + ".json"


def read_summary(index):
    """(path, summary dict or None when there is no summary beside ``index``), the summary checked."""
    path = summary_path(index)
    if not os.path.exists(path):
        return path, None
    again = f"write it again with the command that wrote {index}"
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise RecordIOError(f"{path} (the summary of {index}) cannot be read ({exc}); {again}") from None
    problem = check_summary(info)
    if problem:
        raise RecordIOError(f"{path} (the summary of {index}): {problem}; {again}")
    return path, info


def _show(v):
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(v, lo=0, hi=_INT64):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_summary(info):
    """What is wrong with a summary (a field, its value and what it should be), or None."""
    if not isinstance(info, dict):
        return f"the file holds a JSON {type(info).__name__}, not an object of fields"
    checks = [("kept", _int, "an integer >= 0"), ("total", _int, "an integer >= 0"),
              ("identities", _int, "an integer >= 0"), ("method", lambda v: isinstance(v, str), "a string"),
              ("threshold", lambda v: v is None or _number(v), "a number or null"),
              ("kept_fraction", lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")]
    for name, ok, what in checks:
        if name in info and not ok(info[name]):
            return f"field {name!r} is {_show(info[name])}, not {what}"
    if _int(info.get("kept")) and _int(info.get("total")) and info["kept"] > info["total"]:
        return f"field 'kept' is {info['kept']}, more than 'total' ({info['total']})"
    hist = info.get("kept_per_identity_histogram")
    if "kept_per_identity_histogram" in info:
        if not isinstance(hist, dict):
            return f"field 'kept_per_identity_histogram' is {_show(hist)}, not an object {{faces kept: identities}}"
        for k, v in hist.items():
            if not (re.fullmatch(r"[0-9]+", k) and _int(int(k)) and _int(v)):
                return (f"field 'kept_per_identity_histogram' has the entry {_show(k)}: {_show(v)}, not "
                        f"faces kept (an integer >= 0): identities (an integer >= 0)")
    if "dataset" in info:
        return _check_dataset(info["dataset"])
    return None


def _check_dataset(ds):
    if not isinstance(ds, dict):
        return f"field 'dataset' is {_show(ds)}, not an object (the dataset's provenance)"
    checks = [("train_idx_sha256", lambda v: isinstance(v, str) and _HEX64.match(v), "a sha256 (64 hex digits)"),
              ("train_rec_sample_sha256", lambda v: isinstance(v, str) and _HEX64.match(v),
               "a sha256 (64 hex digits)"),
              ("train_rec_bytes", _int, "an integer >= 0"), ("train_rec_mtime_ns", _int, "an integer >= 0")]
    for name, ok, what in checks:
        if name in ds and not ok(ds[name]):
            return f"field 'dataset.{name}' is {_show(ds[name])}, not {what}"
    if "label_sample" not in ds:
        return None
    sample = ds["label_sample"]
    if not isinstance(sample, dict) or not isinstance(sample.get("keys"), list) or \
            not isinstance(sample.get("labels"), list):
        return f"field 'dataset.label_sample' is {_show(sample)}, not an object with lists 'keys' and 'labels'"
    if len(sample["keys"]) != len(sample["labels"]):
        return (f"field 'dataset.label_sample' lists {len(sample['keys'])} keys and {len(sample['labels'])} labels, "
                f"not one label per key")
    for name, lo, hi, what in (("keys", -_INT64, _INT64, "an int64 record key"),
                               ("labels", 0, LABEL_LIMIT, "an identity id (an integer 0 <= label < 2**24)")):
        bad = next((i for i, v in enumerate(sample[name]) if not _int(v, lo, hi)), None)
        if bad is not None:
            return f"field 'dataset.label_sample.{name}[{bad}]' is {_show(sample[name][bad])}, not {what}"
    return None
