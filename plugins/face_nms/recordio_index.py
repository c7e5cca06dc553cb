"""Image records of an arcface_torch RecordIO folder (train.rec + train.idx), read from headers only.

Two layouts occur:

* insightface style (MS1MV2/3, Glint360K): record 0 is a header (flag >= 2, a label array and no
  image bytes) whose label ``(a, b)`` says that records ``1 .. a-1`` are images and ``a .. b-1``
  identities. insightface's RecBuilder and face2rec2 write it last, so its line may stand anywhere
  in train.idx; it is found in the one parse of train.idx and checked against the keys listed there;
* im2rec style (WebFace42M, shuffled for DALI): no header, every record is an image.

Only the 36 bytes that start each record are read (RecordIO magic and length, then the
``IRHeader`` flag, label, id, id2 and the first extra label), never the image bytes, in
chunks of records, so a 42.5M-record file is indexed in bounded memory. A record that is cut
short, without image bytes, or whose label is no identity id is refused by key.

A record whose bytes hold the magic word at a 4-byte-aligned offset is written by dmlc's
RecordIO writer (mxnet, im2rec, RecBuilder) as several parts: the top 3 bits of each part's
length word (``cflag``) say 0 whole, 1 first, 2 middle, 3 last; each part is padded to 4
bytes and the magic word between two parts is left out. Such records are read as mxnet reads
them: the parts joined with the magic word put back. They are rare (about one per 17 GB of
JPEG records), so headers are peeked for all records at once and only those records walk
their parts (docs/recordio.md).

A filtered index is a standard MXNet ``.idx`` (``key<TAB>offset`` lines) listing some image
records of the original ``train.rec``; DALI's mxnet reader reads it directly.
"""
import os
import struct
from dataclasses import dataclass

import numpy as np

from .files import atomic_output

MAGIC = 0xCED7230A
_PEEK = 36  # magic, lrecord, flag, label, id, id2, first extra label
CHUNK = 1 << 20
LABEL_LIMIT = 1 << 24
_LONGEST_LINE = 4096  # an .idx line is two int64 numbers
_REPACK = "repack the dataset (insightface's RecBuilder or im2rec)"
_LENGTH = (1 << 29) - 1
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CFLAG = {0: "a whole record", 1: "a first part", 2: "a middle part", 3: "a last part"}


class RecordIOError(ValueError):
    """A RecordIO folder, record or index file that cannot be used as it is."""


@dataclass
class RecordIndex:
    """Every image record of a dataset: its key in train.idx, byte offset in train.rec, label (int64)."""
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
    folder = "give the arcface_torch RecordIO folder holding train.rec and train.idx"
    if not os.path.exists(rec_dir):
        raise RecordIOError(f"--rec {rec_dir} not found: {folder}")
    if not os.path.isdir(rec_dir):
        raise RecordIOError(f"--rec {rec_dir} is a file: {folder}")
    rec, idx = os.path.join(rec_dir, "train.rec"), os.path.join(rec_dir, "train.idx")
    for path in (rec, idx):
        if not os.path.isfile(path):
            state = "is not a file" if os.path.exists(path) else "not found"
            raise RecordIOError(f"{path} {state}: --rec must be an arcface_torch RecordIO folder "
                                f"holding train.rec and train.idx")
    return rec, idx


def read_idx(path, chunk_bytes=64 << 20, fix="regenerate it"):
    """(keys, offsets) of an MXNet .idx file, in file order, parsed in chunks.

    Refused: lines that are not ``key<TAB>offset`` integers (as mxnet's own reader refuses them),
    negative or int64-overflowing offsets, a key or an offset listed twice. ``fix`` ends the messages.
    """
    if not os.path.isfile(path):
        raise RecordIOError(f"index file {path} not found")
    keys, offsets = [], []
    tail, line = b"", 1
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                data = tail + block
                if block:
                    cut = data.rfind(b"\n") + 1
                    data, tail = data[:cut], data[cut:]
                    if len(tail) > _LONGEST_LINE:
                        n = line + data.count(b"\n")
                        raise RecordIOError(f"{path} line {n} is longer than {_LONGEST_LINE} bytes: the file is not "
                                            f"an MXNet index file; {fix} or pass the right file")
                if data.strip():
                    keys_c, offsets_c = _parse_idx_block(data, path, line, fix)
                    keys.append(keys_c)
                    offsets.append(offsets_c)
                line += data.count(b"\n")
                if not block:
                    break
    except OSError as exc:
        raise RecordIOError(f"{path} cannot be read ({exc.strerror}); check the file and its permissions") from None
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys, offsets = np.concatenate(keys), np.concatenate(offsets)
    rows = _first_repeat(keys)
    if rows is not None:
        raise RecordIOError(f"{path} lists key {int(keys[rows[0]])} twice (lines {rows[0] + 1} and {rows[1] + 1}); "
                            f"an index lists every record once: {fix}")
    rows = _first_repeat(offsets)
    if rows is not None:
        raise RecordIOError(f"{path}: keys {int(keys[rows[0]])} and {int(keys[rows[1]])} both point to offset "
                            f"{int(offsets[rows[0]])}, one record counted twice; {fix}")
    return keys, offsets


def _parse_idx_block(data, path, first_line, fix):
    fields = data.split()
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    try:
        if len(fields) != 2 * lines:
            raise ValueError
        values = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        raise _idx_line_error(data, path, first_line, fix) from None
    negative = np.flatnonzero(values[:, 1] < 0)
    if len(negative):
        key, offset = values[negative[0]]
        raise RecordIOError(f"{path}: key {key} has offset {offset}, outside any .rec file; {fix}")
    return values[:, 0], values[:, 1]


def _idx_line_error(data, path, first_line, fix):
    """The message for the first line of ``data`` that is not an MXNet index line (error path only)."""
    for n, line in enumerate(data.split(b"\n"), first_line):
        fields = line.split()
        try:
            key, offset = (int(x) for x in fields)
        except ValueError:
            shown = line[:40].decode("utf-8", "replace")
            return RecordIOError(f"{path} line {n} ({shown!r}) is not 'key<TAB>offset' with integers: the file is "
                                 f"not an MXNet index file; {fix} or pass the right file")
        if not -2 ** 63 <= key < 2 ** 63 or not 0 <= offset < 2 ** 63:
            return RecordIOError(f"{path}: key {key} has offset {offset}, outside any .rec file (offsets are "
                                 f"int64); {fix}")
    return RecordIOError(f"{path} is not an MXNet index file (lines of 'key<TAB>offset'); {fix}")


def _first_repeat(values):
    """Rows (i, j) of the first value present twice, or None; linear time for increasing or compact values."""
    n = len(values)
    if n < 2 or np.all(values[1:] > values[:-1]):
        return None
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 2 * n + 1024:
        seen = np.zeros(hi - lo + 1, bool)
        seen[values - lo] = True
        if int(seen.sum()) == n:
            return None
    s = np.sort(values, kind="stable")
    same = np.flatnonzero(s[1:] == s[:-1])
    if not len(same):
        return None
    return np.flatnonzero(values == s[same[0]])[:2]


def _where(key, offset):
    return f"record key {key} (offset {offset})" if key is not None else f"record at offset {offset}"


def _joined(f, offset, size, rec_path, key, want=None):
    """(first ``want`` bytes of the payload, or all of it with ``want`` None; payload length) of the
    multi-part record at ``offset``: its parts joined with the magic word between them, as
    dmlc's RecordIOReader joins them. A chain that is cut short or incoherent is refused."""
    where = _where(key, offset)
    data, total, pos, part = [], 0, offset, 0
    got = 0
    while True:
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{rec_path}: {where} is a multi-part record whose part {part + 1} (at offset {pos}) "
                                f"lies past the end of the file ({size} bytes): train.rec is truncated; copy it again")
        magic, lrec = struct.unpack("<II", head)
        cflag, length = lrec >> 29, lrec & _LENGTH
        if magic != MAGIC:
            raise RecordIOError(f"{rec_path}: {where} is a multi-part record whose part {part + 1} (at offset {pos}) "
                                f"has no RecordIO magic word: the file is corrupt; {_REPACK}")
        if part == 0 and cflag != 1 or part > 0 and cflag not in (2, 3):
            raise RecordIOError(f"{rec_path}: {where} is a multi-part record whose part {part + 1} (at offset {pos}) is "
                                f"{_CFLAG.get(cflag, f'of unknown kind (cflag {cflag})')}: the chain of parts is "
                                f"incoherent; train.idx does not belong to this train.rec or the file is corrupt")
        end = pos + 8 + ((length + 3) & ~3)
        if pos + 8 + length > size:
            raise RecordIOError(f"{rec_path}: {where} is a multi-part record whose part {part + 1} (at offset {pos}, "
                                f"{length} bytes) ends past the end of the file ({size} bytes): train.rec is "
                                f"truncated; copy it again")
        if part:
            total += 4
            if want is None or got < want:
                data.append(_MAGIC_BYTES)
                got += 4
        total += length
        if want is None or got < want:
            n = length if want is None else min(length, want - got)
            data.append(f.read(n))
            got += n
        if total > _LENGTH:
            raise RecordIOError(f"{rec_path}: {where} is a multi-part record longer than RecordIO allows (2**29 "
                                f"bytes): the file is corrupt; {_REPACK}")
        if cflag == 3:
            out = b"".join(data)
            return (out if want is None else out[:want]), total
        pos, part = end, part + 1


def _peek(rec_path, keys, offsets, width=_PEEK):
    """(flag, payload bytes, first ``width`` bytes) of the records at ``offsets``, each checked to be a
    whole record inside the file whose header fits in it. Bytes 8.. of a row are the first bytes of
    the record's payload, its parts joined for a multi-part record."""
    try:
        size = os.path.getsize(rec_path)
        mm = np.memmap(rec_path, dtype=np.uint8, mode="r")
    except OSError as exc:
        raise RecordIOError(f"{rec_path} cannot be read ({exc.strerror}); check the file and its permissions") from None
    pos = np.minimum(offsets[:, None] + np.arange(width), size - 1)
    raw = np.ascontiguousarray(mm[pos])
    del mm
    words = raw[:, :12].copy().view("<u4")
    magic, lrec, flag = words[:, 0], words[:, 1], words[:, 2]
    length = (lrec & _LENGTH).astype(np.int64)

    def first(bad):
        return int(keys[bad[0]]), int(offsets[bad[0]])

    bad = np.flatnonzero(magic != MAGIC)
    if len(bad):
        k, o = first(bad)
        raise RecordIOError(f"{rec_path}: no RecordIO record at offset {o} (key {k} of train.idx, {len(bad)} such "
                            f"key(s)); train.idx does not belong to this train.rec or the file is corrupt")
    parts = np.flatnonzero(lrec >> 29)
    whole = np.ones(len(keys), bool)
    if len(parts):
        whole[parts] = False
        try:
            with open(rec_path, "rb") as f:
                for i in parts.tolist():
                    head, length[i] = _joined(f, int(offsets[i]), size, rec_path, int(keys[i]), width - 8)
                    raw[i, 8:8 + len(head)] = np.frombuffer(head, np.uint8)
                    flag[i] = struct.unpack("<I", raw[i, 8:12].tobytes())[0]
        except OSError as exc:
            raise RecordIOError(f"{rec_path} cannot be read ({exc.strerror}); check the file and its "
                                f"permissions") from None
    bad = np.flatnonzero(whole & (offsets + 8 + length > size))
    if len(bad):
        k, o = first(bad)
        raise RecordIOError(f"{rec_path}: record key {k} (offset {o}, {int(length[bad[0]])} bytes) ends past the end "
                            f"of the file ({size} bytes): train.rec is truncated; copy it again")
    payload = length - 24 - 4 * flag.astype(np.int64)
    bad = np.flatnonzero(payload < 0)
    if len(bad):
        k, o = first(bad)
        raise RecordIOError(f"{rec_path}: record key {k} (offset {o}) is shorter than its own header; the file is "
                            f"corrupt: {_REPACK}")
    return flag, payload, raw


def _header(rec, idx, keys, offsets):
    """(a, b) of an insightface header record (key 0: flag >= 2, a label array and no image bytes) checked
    against the keys of train.idx, or None when key 0 is absent or an image (im2rec layout)."""
    zero = np.flatnonzero(keys == 0)
    if not len(zero):
        return None
    flag, payload, raw = _peek(rec, keys[zero], offsets[zero], width=40)
    if flag[0] < 2 or payload[0] != 0:
        return None
    a, b = (float(v) for v in raw[0, 32:40].copy().view("<f4"))
    says = f"the header record (key 0) of {rec} has label ({a:g}, {b:g})"
    if not (np.isfinite(a) and np.isfinite(b) and a == int(a) and b == int(b)):
        raise RecordIOError(f"{says}, not two integer keys (first identity, end); {_REPACK}")
    a, b = int(a), int(b)
    if not 1 <= a <= b:
        raise RecordIOError(f"{says}: no key range (images 1..a-1, identities a..b-1 need 1 <= a <= b); {_REPACK}")
    for lo, hi, what in ((1, a, "images"), (a, b, "identity records")):
        inside = (keys >= lo) & (keys < hi)
        if int(inside.sum()) != hi - lo:
            missing = np.setdiff1d(np.arange(lo, hi), keys[inside])
            raise RecordIOError(f"{says}, so {what} are keys {lo}..{hi - 1}, but {idx} lacks key {int(missing[0])} "
                                f"({len(missing)} missing); {_REPACK}")
    ends = np.flatnonzero((keys == a - 1) | (keys == a))
    flag, payload, _ = _peek(rec, keys[ends], offsets[ends])
    for k, f, p in zip(keys[ends].tolist(), flag.tolist(), payload.tolist()):
        if k == a - 1 and p == 0:
            raise RecordIOError(f"{says}, so key {k} is the last image, but that record holds no image; {_REPACK}")
        if k == a and p > 0:
            raise RecordIOError(f"{says}, so key {k} is the first identity record, but that record holds an image; "
                                f"{_REPACK}")
    return a, b


def detect_layout(rec_dir):
    """("insightface", a) when record 0 is a header naming image records 1..a-1, else ("im2rec", None)."""
    layout, keys, _ = image_records(rec_dir)
    return (layout, int(keys.max()) + 1) if layout == "insightface" else (layout, None)


def image_records(rec_dir):
    """(layout, keys, offsets) of the image records, in train.idx order, from one parse of train.idx.

    The insightface header (key 0) is found wherever its line stands (RecBuilder writes it last)."""
    rec, idx = rec_paths(rec_dir)
    keys, offsets = read_idx(idx, fix=f"restore the train.idx packed with this train.rec, or {_REPACK}")
    if len(keys) == 0:
        raise RecordIOError(f"{idx} lists no records: the dataset is empty; restore it or {_REPACK}")
    size = os.path.getsize(rec)
    beyond = np.flatnonzero(offsets + 8 > size)
    if len(beyond):
        raise RecordIOError(f"{idx}: key {int(keys[beyond[0]])} has offset {int(offsets[beyond[0]])}, beyond the end "
                            f"of {rec} ({size} bytes; {len(beyond)} such key(s)); train.idx does not belong to this "
                            f"train.rec or train.rec is truncated")
    header = _header(rec, idx, keys, offsets)
    if header is None:
        return "im2rec", keys, offsets
    sel = (keys >= 1) & (keys < header[0])
    return "insightface", keys[sel], offsets[sel]


def _labels(rec, keys, offsets):
    flag, payload, raw = _peek(rec, keys, offsets)
    empty = np.flatnonzero(payload == 0)
    if len(empty):
        raise RecordIOError(f"{rec}: record key {int(keys[empty[0]])} (offset {int(offsets[empty[0]])}) holds no image "
                            f"bytes, only its header ({len(empty)} such record(s)); {_REPACK}")
    label = np.where(flag > 0, raw[:, 32:36].copy().view("<f4")[:, 0], raw[:, 12:16].copy().view("<f4")[:, 0])
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~np.isfinite(label) | (label < 0) | (label != np.floor(label)) | (label >= LABEL_LIMIT))
    if len(bad):
        raise RecordIOError(f"{rec}: record key {int(keys[bad[0]])} has label {float(label[bad[0]])!r}, which is no "
                            f"identity id (an integer 0 <= label < 2**24; {len(bad)} such record(s)); {_REPACK} "
                            f"with identity ids 0, 1, 2, ...")
    return label.astype(np.int64)


def read_index(rec_dir, chunk=CHUNK):
    """RecordIndex of every image record of ``rec_dir``; labels read from record headers in chunks.

    Every image record is checked to be whole, to hold image bytes and to carry an identity id
    ``y``: an integer with 0 <= y < 2**24. The bound is where float32, the type of an ``IRHeader``
    label, stops holding every integer (2**24 + 1 is stored as 2**24, merging two identities), so
    no larger label survives packing; it also caps ``num_classes``-sized arrays (one count per
    identity) at 2**24 entries whatever a corrupt header says, where a label of 2**40 would ask
    for 8 TiB. Real datasets stay far below it (WebFace260M: 4M identities).
    """
    rec, _ = rec_paths(rec_dir)
    layout, keys, offsets = image_records(rec_dir)
    if len(keys) == 0:
        raise RecordIOError(f"{rec_dir} holds no image records: the dataset is empty")
    return RecordIndex(rec_dir, layout, keys, offsets, record_labels(rec, keys, offsets, chunk))


def record_labels(rec, keys, offsets, chunk=CHUNK):
    """Identity labels (int64) of the image records at ``offsets`` of ``rec``, read in chunks of headers."""
    return np.concatenate([_labels(rec, keys[s:s + chunk], offsets[s:s + chunk])
                           for s in range(0, len(keys), chunk)])


def read_record(f, offset, rec_path, key=None):
    """The payload (IRHeader + image bytes) of the record at ``offset`` of the open .rec file ``f``,
    as mxnet reads it: the parts of a multi-part record joined with the magic word between them.
    ``key`` (its train.idx key) is named in the messages."""
    f.seek(offset)
    head = f.read(8)
    magic, lrec = struct.unpack("<II", head) if len(head) == 8 else (None, 0)
    if magic != MAGIC:
        raise RecordIOError(f"{rec_path}: no RecordIO record at offset {offset}"
                            f"{f' (key {key})' if key is not None else ''}; the .idx does not match this train.rec")
    cflag, length = lrec >> 29, lrec & _LENGTH
    if cflag == 0:
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(f"{rec_path}: {_where(key, offset)} ({length} bytes) ends past the end of the file: "
                                f"train.rec is truncated; copy it again")
        return data
    return _joined(f, offset, os.fstat(f.fileno()).st_size, rec_path, key)[0]


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
    if os.path.exists(index_path) and not os.path.isfile(index_path):
        raise RecordIOError(f"filtered index {index_path} is not a file: give the .idx written by `python -m "
                            f"plugins.face_nms select`")
    if not os.path.isfile(index_path):
        raise RecordIOError(f"filtered index {index_path} not found: run `python -m plugins.face_nms select` "
                            f"first or fix config.face_nms['index']")
    keys, offsets = read_idx(index_path, fix="select again")
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
