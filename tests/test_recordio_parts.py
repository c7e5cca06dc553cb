"""Multi-part RecordIO records: mxnet's writer splits a record wherever its bytes hold the magic word at an
aligned offset; every reader here must join them as mxnet's reader does."""
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from plugins.compat import import_mxnet
from plugins.face_nms.decode import RecordImages, decode_record
from plugins.face_nms.demo import synthetic_faces
from plugins.face_nms.recordio_index import (MAGIC, RecordIOError, read_idx, read_index, read_record,
                                             record_labels, write_idx)

mx = import_mxnet()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")
WORD = struct.pack("<I", MAGIC)  # b'\x0a\x23\xd7\xce'
HEADER = 24  # IRHeader bytes before the image in a packed payload (flag 0)


def jpeg(img):
    import cv2
    return cv2.imencode(".jpg", img[:, :, ::-1])[1].tobytes()


def png(img):
    import cv2
    return cv2.imencode(".png", img[:, :, ::-1])[1].tobytes()


def with_words(image, count, at=0):
    """The image with a comment holding ``count`` magic words, each at a 4-aligned offset of the packed
    payload (HEADER + image offset): a JPEG COM segment after SOI, or a PNG tEXt chunk after IHDR."""
    if image[:2] == b"\xff\xd8":
        start = 2 + 4  # marker and length of the COM segment
        pad = (-(HEADER + start + at)) % 4
        body = b"c" * (at + pad) + b"".join(WORD + b"abcd" for _ in range(count))
        segment = b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body
        return image[:2] + segment + image[2:]
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    ihdr_end = 8 + 25
    text = b"Comment\x00"
    start = ihdr_end + 8 + len(text)
    pad = (-(HEADER + start + at)) % 4
    body = text + b"c" * (at + pad) + b"".join(WORD + b"abcd" for _ in range(count))
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return image[:ihdr_end] + chunk + image[ihdr_end:]


def aligned_words(payload):
    return sum(payload[i:i + 4] == WORD for i in range(0, len(payload) - 3, 4))


@pytest.fixture(scope="module")
def faces():
    images, labels, _ = synthetic_faces(n_ids=5, seed=7)
    return images, labels


def records_of(faces, every=3):
    """(key, label, payload): every ``every``-th image holds 1-3 magic words (JPEG and PNG)."""
    images, labels = faces
    out = []
    for k, (img, lab) in enumerate(zip(images, labels)):
        data = png(img) if k % 2 else jpeg(img)
        if k % every == 0:
            data = with_words(data, 1 + k % 3)
        out.append((k, float(lab), mx.recordio.pack(mx.recordio.IRHeader(0, float(lab), k, 0), data)))
    return out


def write_with_mxnet(rec_dir, records):
    os.makedirs(rec_dir, exist_ok=True)
    w = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "w")
    for key, _, payload in records:
        w.write_idx(key, payload)
    w.close()
    return rec_dir


def part_flags(rec_dir):
    """cflag of the first part of every record listed in train.idx, by key."""
    keys, offsets = read_idx(os.path.join(rec_dir, "train.idx"))
    with open(os.path.join(rec_dir, "train.rec"), "rb") as f:
        out = {}
        for k, o in zip(keys.tolist(), offsets.tolist()):
            f.seek(o)
            out[k] = struct.unpack("<II", f.read(8))[1] >> 29
    return out


@pytest.fixture(scope="module")
def parted(faces, tmp_path_factory):
    records = records_of(faces)
    d = write_with_mxnet(str(tmp_path_factory.mktemp("parts")), records)
    return d, records


def test_mxnet_writes_such_records_in_parts(parted):
    d, records = parted
    flags = part_flags(d)
    split = [k for k, _, p in records if aligned_words(p)]
    assert len(split) >= 10 and all(flags[k] == 1 for k in split)
    assert all(flags[k] == 0 for k, _, p in records if not aligned_words(p))


def test_index_labels_and_payloads_match_mxnet(parted):
    d, records = parted
    r = mx.recordio.MXIndexedRecordIO(os.path.join(d, "train.idx"), os.path.join(d, "train.rec"), "r")
    index = read_index(d, chunk=4)
    assert index.keys.tolist() == [k for k, _, _ in records]
    mx_labels = [int(mx.recordio.unpack(r.read_idx(k))[0].label) for k in index.keys.tolist()]
    assert index.labels.tolist() == mx_labels == [int(lab) for _, lab, _ in records]
    import cv2
    rec = os.path.join(d, "train.rec")
    with open(rec, "rb") as f:
        for key, off, (_, _, payload) in zip(index.keys.tolist(), index.offsets.tolist(), records):
            ours = read_record(f, off, rec, key)
            theirs = r.read_idx(key)
            assert ours == theirs == payload
            header, img = mx.recordio.unpack(theirs)
            want = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            assert np.array_equal(decode_record(ours, rec, off, key), want)
    images = RecordImages(rec, index.offsets, index.keys)
    split = [i for i, (_, _, p) in enumerate(records) if aligned_words(p)]
    assert np.array_equal(images[split[0]].numpy(), mx.image.imdecode(mx.recordio.unpack(
        r.read_idx(int(index.keys[split[0]])))[1]).asnumpy())


def test_first_part_shorter_than_the_header(faces, tmp_path):
    """The magic word in the IRHeader itself (id or id2): the first part holds 8 or 16 bytes."""
    images, labels = faces
    records = []
    for k in range(6):
        ident, id2 = (MAGIC, 0) if k % 2 else (k, MAGIC)
        header = mx.recordio.IRHeader(0, float(labels[k]), ident, id2)
        records.append((k, float(labels[k]), mx.recordio.pack(header, jpeg(images[k]))))
    header = mx.recordio.IRHeader(2, [float(labels[6]), 5.0], MAGIC, 0)  # a label array after the split
    records.append((6, float(labels[6]), mx.recordio.pack(header, jpeg(images[6]))))
    d = write_with_mxnet(str(tmp_path / "ds"), records)
    assert set(part_flags(d).values()) == {1}
    r = mx.recordio.MXIndexedRecordIO(os.path.join(d, "train.idx"), os.path.join(d, "train.rec"), "r")
    index = read_index(d)
    mx_labels = [int(np.atleast_1d(mx.recordio.unpack(r.read_idx(k))[0].label)[0]) for k in range(7)]
    assert index.labels.tolist() == mx_labels == labels[:7].tolist()
    rec = os.path.join(d, "train.rec")
    assert record_labels(rec, index.keys[::-1], index.offsets[::-1]).tolist() == mx_labels[::-1]
    with open(rec, "rb") as f:
        assert [read_record(f, o, rec) for o in index.offsets.tolist()] == [r.read_idx(k) for k in range(7)]


def test_magic_word_at_the_very_end(faces, tmp_path):
    """A record whose last aligned word is the magic word: its last part is empty."""
    images, labels = faces
    data = jpeg(images[0])
    data += b"\x00" * ((-(HEADER + len(data))) % 4) + WORD
    payload = mx.recordio.pack(mx.recordio.IRHeader(0, float(labels[0]), 0, 0), data)
    d = write_with_mxnet(str(tmp_path / "ds"), [(0, labels[0], payload), (1, labels[1], payload)])
    r = mx.recordio.MXIndexedRecordIO(os.path.join(d, "train.idx"), os.path.join(d, "train.rec"), "r")
    rec = os.path.join(d, "train.rec")
    index = read_index(d)
    with open(rec, "rb") as f:
        assert read_record(f, int(index.offsets[1]), rec) == r.read_idx(1) == payload
    assert index.labels.tolist() == [labels[0]] * 2


def chain(rec_dir, key):
    """(offset, cflag, length) of each part of record ``key``."""
    keys, offsets = read_idx(os.path.join(rec_dir, "train.idx"))
    pos = int(offsets[keys.tolist().index(key)])
    out = []
    with open(os.path.join(rec_dir, "train.rec"), "rb") as f:
        while True:
            f.seek(pos)
            magic, lrec = struct.unpack("<II", f.read(8))
            out.append((pos, lrec >> 29, lrec & ((1 << 29) - 1)))
            if lrec >> 29 in (0, 3):
                return out
            pos += 8 + ((lrec & ((1 << 29) - 1)) + 3) // 4 * 4


def patch(path, at, data):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def every_reader(d):
    """The message of each reader of the dataset: index, labels, one record."""
    rec = os.path.join(d, "train.rec")
    messages = []
    for read in (lambda: read_index(d),
                 lambda: [read_record(open(rec, "rb"), o, rec, k) for k, o in zip(*read_idx(os.path.join(d, "train.idx")))]):
        with pytest.raises(RecordIOError) as e:
            read()
        messages.append(str(e.value))
    return messages


@pytest.mark.parametrize("case", ["truncated", "no_magic", "restart", "starts_inside"])
def test_broken_chains_are_one_line(faces, tmp_path, case):
    records = records_of(faces, every=2)
    last = max(i for i, (_, _, p) in enumerate(records) if aligned_words(p) >= 2)
    records = records[:last] + records[last + 1:] + [records[last]]  # a record in 3+ parts written last
    d = write_with_mxnet(str(tmp_path / "ds"), records)
    rec = os.path.join(d, "train.rec")
    split = [k for k, _, p in records if aligned_words(p) >= 2]
    key = split[len(split) // 2]
    parts = chain(d, key)
    assert len(parts) >= 3
    start = parts[0][0]
    if case == "truncated":
        key = records[-1][0]
        start = chain(d, key)[0][0]
        with open(rec, "r+b") as f:
            f.truncate(chain(d, key)[-1][0] + 4)
        want = rf"record key {key} \(offset {start}\) is a multi-part record whose part \d \(at offset \d+.*past the end"
    elif case == "no_magic":
        patch(rec, parts[1][0], b"\x00\x00\x00\x00")
        want = rf"record key {key} \(offset {start}\) is a multi-part record whose part 2 \(at offset {parts[1][0]}\) " \
               r"has no RecordIO magic"
    elif case == "restart":
        patch(rec, parts[1][0] + 4, struct.pack("<I", (1 << 29) | parts[1][2]))
        want = rf"record key {key} \(offset {start}\) .*part 2 \(at offset {parts[1][0]}\) is a first part: the chain"
    else:  # train.idx points at the middle part of a record
        lines = open(os.path.join(d, "train.idx")).read().splitlines()
        lines = [f"{key}\t{parts[1][0]}" if line.split("\t")[0] == str(key) else line for line in lines]
        open(os.path.join(d, "train.idx"), "w").write("\n".join(lines) + "\n")
        start = parts[1][0]
        want = rf"record key {key} \(offset {start}\) is a multi-part record whose part 1 .* is a middle part"
    for message in every_reader(d):
        assert "\n" not in message and rec in message
        import re
        assert re.search(want, message), message


def test_filter_and_extraction_read_such_records(parted, tmp_path):
    """The filtered index of a dataset with multi-part records loads, and extraction decodes every record."""
    import torch

    from plugins.face_nms.demo import TinyNet
    from plugins.face_nms.extract import extract_features
    from plugins.face_nms.models import TorchModel
    from plugins.face_nms.recordio_index import load_filtered_index
    d, records = parted
    index = read_index(d)
    idx = str(tmp_path / "kept.idx")
    write_idx(idx, index.keys[1::2], index.offsets[1::2])
    assert np.array_equal(load_filtered_index(idx, d), index.keys[1::2])
    torch.set_num_threads(1)
    out = extract_features(d, str(tmp_path / "f"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=4, workers=0,
                           chunk_rows=8, progress=False)
    feats = np.load(os.path.join(out, "features.npy"))
    assert feats.shape[0] == len(records) and np.all(np.isfinite(feats))
    # each row is the feature of the image mxnet reads at that key
    r = mx.recordio.MXIndexedRecordIO(os.path.join(d, "train.idx"), os.path.join(d, "train.rec"), "r")
    k = next(i for i, (_, _, p) in enumerate(records) if aligned_words(p))
    img = mx.image.imdecode(mx.recordio.unpack(r.read_idx(k))[1]).asnumpy()
    model = TorchModel(TinyNet(seed=0), "cpu")
    want = np.asarray(model(torch.from_numpy(img[None].copy()), False), np.float16)
    assert np.allclose(feats[k].astype(np.float32), want[0].astype(np.float32), atol=2e-3)


def test_recbuilder_dataset_with_parts_through_the_host_dataset(faces, tmp_path):
    if not INSIGHTFACE_DIR:
        pytest.skip("INSIGHTFACE_DIR is not set: this test packs a dataset with insightface's RecBuilder and reads "
                    "it with the host's MXFaceDataset")
    images, labels = faces
    common = os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_mxnet", "common", "rec_builder.py")
    at = str(tmp_path / "arcface_torch")
    shutil.copytree(os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_torch"), at,
                    ignore=shutil.ignore_patterns("__pycache__", "work_dirs"), symlinks=True)
    shutil.copy(common, at)
    # RecBuilder.add packs bytes as they are (arrays it encodes itself): JPEGs holding the magic word
    blobs = [with_words(jpeg(img), 1 + i % 2) if i % 2 == 0 else jpeg(img) for i, img in enumerate(images)]
    np.save(str(tmp_path / "labels.npy"), labels)
    with open(tmp_path / "blobs.json", "w") as f:
        json.dump([b.hex() for b in blobs], f)
    d = str(tmp_path / "ds")
    idx = str(tmp_path / "kept.idx")
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {ROOT!r})
        from plugins.compat import import_mxnet
        mx = import_mxnet()
        from rec_builder import RecBuilder
        labels = np.load({str(tmp_path / "labels.npy")!r})
        blobs = [bytes.fromhex(h) for h in json.load(open({str(tmp_path / "blobs.json")!r}))]
        b = RecBuilder({d!r}, image_size=(112, 112))
        for lab in np.unique(labels):
            b.add(int(lab), [blobs[i] for i in np.flatnonzero(labels == lab)])
        b.close()
        b.writer.close()
        print("packed")
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([sys.executable, "-c", code], cwd=at, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    flags = part_flags(d)
    assert sum(v == 1 for v in flags.values()) >= len(images) // 2
    index = read_index(d)
    assert index.layout == "insightface" and len(index) == len(images)
    rows = np.arange(0, len(index), 2)
    write_idx(idx, index.keys[rows], index.offsets[rows])
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {ROOT!r})
        from plugins.compat import import_mxnet
        import_mxnet()  # mxnet 1.9.1 on numpy >= 1.24, as the patched host does
        import torch
        torch.manual_seed(0)
        from easydict import EasyDict as edict
        from dataset import MXFaceDataset
        from plugins.registry import apply_dataset_filter
        cfg = edict(rec={d!r}, num_image=10 ** 9, dataset_filter="face_nms",
                    face_nms=dict(index={idx!r}, trust_index=True))
        ds = apply_dataset_filter(cfg, MXFaceDataset(root_dir=cfg.rec, local_rank=0))
        items = [ds[i] for i in range(len(ds))]
        print(json.dumps({{"keys": [int(k) for k in ds.imgidx], "labels": [int(x[1]) for x in items],
                          "images": [x[0].numpy().round(4).tolist() for x in items[:3]]}}))
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=at, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    host = json.loads(r.stdout.strip().splitlines()[-1])
    assert host["keys"] == index.keys[rows].tolist() and host["labels"] == index.labels[rows].tolist()
    ours = RecordImages(os.path.join(d, "train.rec"), index.offsets[rows], index.keys[rows])
    for i, img in enumerate(host["images"]):
        # the host's transform: ToTensor, Normalize(0.5, 0.5) of the RGB image (flip off: probability)
        want = (ours[i].numpy().astype(np.float32) / 255 - 0.5) / 0.5
        got = np.asarray(img, np.float32).transpose(1, 2, 0)
        assert np.allclose(got, want, atol=1e-3) or np.allclose(got, want[:, ::-1], atol=1e-3)
