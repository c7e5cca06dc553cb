"""Image records of an arcface_torch RecordIO folder (train.rec + train.idx), read from headers only.

Two layouts occur:

* insightface style (MS1MV2/3, Glint360K): record 0 is a header whose flag > 0 and whose
  label ``(a, b)`` says that records ``1 .. a-1`` are images and ``a .. b-1`` identities;
* im2rec style (WebFace42M, shuffled for DALI): no header, every record is an image.

Only the 36 bytes that start each record are read (RecordIO magic and length, then the
``IRHeader`` flag, label, id, id2 and the first extra label), never the image bytes, in
chunks of records, so a 42.5M-record file is indexed in bounded memory.

A filtered index is a standard MXNet ``.idx`` (``key<TAB>offset`` lines) listing some image
records of the original ``train.rec``; DALI's mxnet reader reads it directly.
"""
import os
from dataclasses import dataclass

import numpy as np

from .files import atomic_output

MAGIC = 0xCED7230A
_PEEK = 36  # magic, lrecord, flag, label, id, id2, first extra label
CHUNK = 1 << 20


class RecordIOError(ValueError):
    """A RecordIO folder, record or index file that cannot be used as it is."""


@dataclass
class RecordIndex:
    """Every image record of a dataset: its key in train.idx, byte offset in train.rec, label."""
    rec_dir: str
    layout: str  # "insightface" or "im2rec"
    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.keys)

    @property
    def num_classes(self):
        return int(self.labels.max()) + 1 if len(self.labels) else 0


def rec_paths(rec_dir):
    rec, idx = os.path.join(rec_dir, "train.rec"), os.path.join(rec_dir, "train.idx")
    for path in (rec, idx):
        if not os.path.isfile(path):
            raise RecordIOError(f"{path} not found: --rec must be an arcface_torch RecordIO folder "
                                f"holding train.rec and train.idx")
    return rec, idx


def read_idx(path, chunk_bytes=64 << 20):
    """(keys, offsets) of an MXNet .idx file, in file order, parsed in chunks."""
    if not os.path.isfile(path):
        raise RecordIOError(f"index file {path} not found")
    keys, offsets = [], []
    tail = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            data = tail + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, tail = data[:cut], data[cut:]
            if data.strip():
                keys_c, offsets_c = _parse_idx_block(data, path)
                keys.append(keys_c)
                offsets.append(offsets_c)
            if not block:
                break
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(offsets)


def _parse_idx_block(data, path):
    lines = data.split()
    if len(lines) % 2:
        raise RecordIOError(f"{path} is not an MXNet index file (lines of 'key<TAB>offset'): "
                            f"odd number of fields; regenerate it or pass the right file")
    try:
        values = np.array(lines, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        raise RecordIOError(f"{path} is not an MXNet index file (lines of 'key<TAB>offset'): "
                            f"found a non-integer field") from None
    return values[:, 0], values[:, 1]


def peek_headers(rec_path, offsets):
    """flag, label (first label when flag > 0) and magic of the records at ``offsets``."""
    size = os.path.getsize(rec_path)
    if len(offsets) == 0:
        return np.zeros(0, np.uint32), np.zeros(0, np.float32)
    if offsets.min() < 0 or offsets.max() + 8 > size:
        raise RecordIOError(f"{rec_path}: train.idx points past the end of train.rec ({size} bytes); "
                            f"the .idx does not belong to this .rec or the .rec is truncated")
    mm = np.memmap(rec_path, dtype=np.uint8, mode="r")
    pos = np.minimum(offsets[:, None] + np.arange(_PEEK), size - 1)
    raw = np.ascontiguousarray(mm[pos])
    del mm
    words = raw.view("<u4")  # 9 little-endian words per record
    magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
    bad = np.flatnonzero(magic != MAGIC)
    if len(bad):
        raise RecordIOError(f"{rec_path}: no RecordIO record at offset {int(offsets[bad[0]])} "
                            f"({len(bad)} such offsets); train.idx does not match train.rec or the file is corrupt")
    length = lrec & ((1 << 29) - 1)
    if np.any(length < 24):
        k = int(np.flatnonzero(length < 24)[0])
        raise RecordIOError(f"{rec_path}: record at offset {int(offsets[k])} is too short to hold an image header")
    fl = raw[:, 12:16].copy().view("<f4")[:, 0]
    extra = raw[:, 32:36].copy().view("<f4")[:, 0]
    label = np.where(flag > 0, extra, fl)
    return flag, label


def detect_layout(rec_dir):
    """("insightface", a) when record 0 is a header naming image records 1..a-1, else ("im2rec", None)."""
    rec, idx = rec_paths(rec_dir)
    keys, offsets = _first_lines(idx)
    if len(keys) == 0:
        raise RecordIOError(f"{idx} lists no records: the dataset is empty")
    zero = np.flatnonzero(keys == 0)
    if len(zero):
        with open(rec, "rb") as f:
            f.seek(int(offsets[zero[0]]))
            head = f.read(_PEEK + 4)
        if len(head) >= _PEEK + 4:
            magic, lrec, flag = np.frombuffer(head[:12], "<u4")
            a, b = np.frombuffer(head[32:40], "<f4")
            # a header carries its label array and no image bytes
            if magic == MAGIC and flag >= 2 and (lrec & ((1 << 29) - 1)) == 24 + 4 * flag and 1 <= a <= b:
                return "insightface", int(a)
    return "im2rec", None


def _first_lines(idx, n=64):
    with open(idx, "rb") as f:
        head = b"".join(f.readline() for _ in range(n))
    return _parse_idx_block(head, idx)


def image_records(rec_dir):
    """(layout, keys, offsets) of the image records, in train.idx order, from the .idx alone."""
    _, idx = rec_paths(rec_dir)
    layout, first_identity = detect_layout(rec_dir)
    keys, offsets = read_idx(idx)
    if layout == "insightface":
        sel = (keys >= 1) & (keys < first_identity)
        keys, offsets = keys[sel], offsets[sel]
    return layout, keys, offsets


def _labels(rec, keys, offsets):
    _, label = peek_headers(rec, offsets)
    bad = ~np.isfinite(label) | (label < 0) | (label != np.floor(label))
    if np.any(bad):
        raise RecordIOError(f"{rec}: record {int(keys[np.flatnonzero(bad)[0]])} has no non-negative integer "
                            f"identity label")
    return label.astype(np.int64)


def read_index(rec_dir, chunk=CHUNK):
    """RecordIndex of every image record of ``rec_dir``; labels read from record headers in chunks."""
    rec, _ = rec_paths(rec_dir)
    layout, keys, offsets = image_records(rec_dir)
    if len(keys) == 0:
        raise RecordIOError(f"{rec_dir} holds no image records: the dataset is empty")
    labels = np.concatenate([_labels(rec, keys[s:s + chunk], offsets[s:s + chunk])
                             for s in range(0, len(keys), chunk)])
    return RecordIndex(rec_dir, layout, keys, offsets, labels)


def write_idx(path, keys, offsets, chunk=1 << 20):
    """Writes an MXNet .idx atomically: a temporary file beside ``path``, then a rename."""
    keys, offsets = np.asarray(keys, np.int64), np.asarray(offsets, np.int64)
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        for s in range(0, len(keys), chunk):
            f.write("".join(f"{k}\t{o}\n" for k, o in zip(keys[s:s + chunk].tolist(),
                                                         offsets[s:s + chunk].tolist())))
        f.flush()
        os.fsync(f.fileno())
    return path


def load_filtered_index(index_path, rec_dir):
    """Keys of a filtered index, checked against the dataset's own train.idx.

    Every key must be an image record of ``rec_dir`` at the same offset; otherwise the
    index belongs to another dataset (or another packing) and training must not start.
    """
    _, idx = rec_paths(rec_dir)
    if not os.path.isfile(index_path):
        raise RecordIOError(f"filtered index {index_path} not found: run `python -m plugins.face_nms select` "
                            f"first or fix config.face_nms['index']")
    keys, offsets = read_idx(index_path)
    if len(keys) == 0:
        raise RecordIOError(f"filtered index {index_path} lists no records")
    if len(np.unique(keys)) != len(keys):
        raise RecordIOError(f"filtered index {index_path} lists some keys twice; regenerate it")
    _, all_keys, all_offsets = image_records(rec_dir)
    if len(all_keys) == 0:
        raise RecordIOError(f"{rec_dir} holds no image records: the dataset is empty")
    sorter = np.argsort(all_keys, kind="stable")
    pos = np.minimum(np.searchsorted(all_keys, keys, sorter=sorter), len(all_keys) - 1)
    same = (all_keys[sorter[pos]] == keys) & (all_offsets[sorter[pos]] == offsets)
    if not np.all(same):
        k = int(keys[np.flatnonzero(~same)[0]])
        raise RecordIOError(f"filtered index {index_path} does not belong to {rec_dir}: key {k} is not an image "
                            f"record of {idx} at the same offset ({int((~same).sum())} such keys); "
                            f"select again from features of this dataset")
    return keys
