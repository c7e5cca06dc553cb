"""RecordIO folders as real tools pack them (insightface's RecBuilder, im2rec) and as real mistakes break them."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plugins.compat import import_mxnet
from plugins.face_nms.__main__ import main as cli
from plugins.face_nms.demo import synthetic_faces
from plugins.face_nms.recordio_index import RecordIOError, image_records, read_idx, read_index

mx = import_mxnet()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")


@pytest.fixture(scope="module")
def faces():
    images, labels, _ = synthetic_faces(n_ids=12, seed=3)  # 127 faces: train.idx longer than any fixed look-ahead
    return images[:, ::4, ::4].copy(), labels  # 28x28: the index never decodes images


def jpeg(img):
    import cv2
    return cv2.imencode(".jpg", img[:, :, ::-1])[1].tobytes()


def write_header_last(rec_dir, images, labels, header=None):
    """The record sequence insightface's RecBuilder writes: images 1..N grouped by identity, one record
    (start, end) per identity, then the header (first identity key, end) as key 0, last in both files."""
    os.makedirs(rec_dir, exist_ok=True)
    w = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "w")
    key, spans = 1, []
    for lab in np.unique(labels):
        start = key
        for i in np.flatnonzero(labels == lab):
            w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(lab), key, 0), jpeg(images[i])))
            key += 1
        spans.append((start, key))
    first_identity = key
    for span in spans:
        w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, list(span), key, 0), b""))
        key += 1
    a, b = header if header is not None else (first_identity, key)
    w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [a, b], 0, 1), b""))
    w.close()
    return rec_dir


def write_records(rec_dir, records):
    """im2rec-style folder of (key, label, payload) records, label a number or a label array."""
    os.makedirs(rec_dir, exist_ok=True)
    w = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "w")
    for key, label, payload in records:
        w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, label, key, 0), payload))
    w.close()
    return rec_dir


def idx_lines(rec_dir):
    with open(os.path.join(rec_dir, "train.idx")) as f:
        return f.read().splitlines()


def set_idx_lines(rec_dir, lines):
    with open(os.path.join(rec_dir, "train.idx"), "w") as f:
        f.write("".join(line + "\n" for line in lines))


def move_key0(rec_dir, where, seed=0):
    lines = idx_lines(rec_dir)
    zero = [line for line in lines if line.split("\t")[0] == "0"]
    rest = [line for line in lines if line.split("\t")[0] != "0"]
    if where == "first":
        lines = zero + rest
    elif where == "middle":
        lines = rest[:len(rest) // 2] + zero + rest[len(rest) // 2:]
    elif where == "shuffled":
        lines = [lines[i] for i in np.random.default_rng(seed).permutation(len(lines))]
    set_idx_lines(rec_dir, lines)


def mxface_reference(rec_dir):
    """(keys, labels) of the image records the way the host's MXFaceDataset finds them, read by mxnet."""
    r = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
    header, _ = mx.recordio.unpack(r.read_idx(0))
    keys = list(range(1, int(header.label[0]))) if header.flag > 0 else list(r.keys)
    labels = []
    for k in keys:
        h, _ = mx.recordio.unpack(r.read_idx(k))
        labels.append(int(np.atleast_1d(h.label)[0]))
    return keys, labels


def cli_error(*argv):
    """The one line `python -m plugins.face_nms ...` prints for a data error."""
    with pytest.raises(SystemExit) as e:
        cli(list(argv))
    message = str(e.value.code)
    assert "\n" not in message and message.startswith(f"face_nms {argv[0]}: error: ")
    return message


@pytest.mark.parametrize("where", ["last", "first", "middle", "shuffled"])
def test_insightface_layout_wherever_key0_stands(faces, tmp_path, where, capsys):
    images, labels = faces
    d = write_header_last(str(tmp_path / "ds"), images, labels)
    if where != "last":
        move_key0(d, where)
    at = [line.split("\t")[0] for line in idx_lines(d)].index("0")
    assert at == {"first": 0, "last": len(labels) + 12}.get(where, at) and (where == "first" or at > 64)
    keys, ref_labels = mxface_reference(d)
    index = read_index(d, chunk=5)
    assert index.layout == "insightface"
    assert sorted(index.keys.tolist()) == keys == list(range(1, len(labels) + 1))
    by_key = dict(zip(keys, ref_labels))
    assert index.labels.tolist() == [by_key[k] for k in index.keys.tolist()]
    assert index.labels.dtype == np.int64 and index.num_classes == 12
    cli(["stats", "--rec", d])
    out = capsys.readouterr().out
    assert f"num_image    {len(labels)}\n" in out and "num_classes  12 " in out and "insightface layout" in out


def test_proxy_subset_lists_image_records_only(faces, tmp_path):
    images, labels = faces
    d = write_header_last(str(tmp_path / "ds"), images, labels)
    out = str(tmp_path / "proxy.idx")
    cli(["proxy-subset", "--rec", d, "--ratio", "1", "--out", out])
    keys, _ = read_idx(out)
    assert sorted(keys.tolist()) == list(range(1, len(labels) + 1))


def test_recbuilder_dataset_matches_the_host_dataset(faces, tmp_path):
    if not INSIGHTFACE_DIR:
        pytest.skip("INSIGHTFACE_DIR is not set: this test packs a dataset with insightface's RecBuilder")
    images, labels = faces
    builder = os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_mxnet", "common", "rec_builder.py")
    at = str(tmp_path / "arcface_torch")
    shutil.copytree(os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_torch"), at,
                    ignore=shutil.ignore_patterns("__pycache__", "work_dirs"), symlinks=True)
    shutil.copy(builder, at)
    np.save(str(tmp_path / "images.npy"), images)
    np.save(str(tmp_path / "labels.npy"), labels)
    d = str(tmp_path / "ds")
    code = textwrap.dedent(f"""
        import json
        import sys
        import numpy as np
        sys.path.insert(0, {ROOT!r})
        from plugins.compat import import_mxnet
        import_mxnet()  # mxnet 1.9.1 on numpy >= 1.24 and Python 3.12, as the patched host does
        from rec_builder import RecBuilder
        from dataset import MXFaceDataset
        images, labels = np.load({str(tmp_path / "images.npy")!r}), np.load({str(tmp_path / "labels.npy")!r})
        b = RecBuilder({d!r}, image_size=(28, 28))
        for lab in np.unique(labels):
            b.add(int(lab), [img[:, :, ::-1] for img in images[labels == lab]])  # RecBuilder takes BGR
        b.close()
        b.writer.close()  # what the end of a packing script does; RecBuilder.close leaves it open
        ds = MXFaceDataset({d!r}, 0)
        print(json.dumps({{"keys": [int(k) for k in ds.imgidx], "labels": [int(ds[i][1]) for i in range(len(ds))]}}))
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([sys.executable, "-c", code], cwd=at, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    host = json.loads(r.stdout.strip().splitlines()[-1])
    assert idx_lines(d)[-1].startswith("0\t")  # the header is written last
    index = read_index(d)
    assert index.layout == "insightface"
    assert index.keys.tolist() == host["keys"] and index.labels.tolist() == host["labels"]
    assert len(index) == len(labels) and index.num_classes == len(np.unique(labels)) == max(host["labels"]) + 1


@pytest.mark.parametrize("case", ["swapped", "a0", "b_beyond", "image_missing", "a_too_large", "a_too_small",
                                  "a_fraction"])
def test_header_ranges_are_checked_against_the_keys(faces, tmp_path, case):
    images, labels = faces
    n, ids = len(labels), 12
    a, b = n + 1, n + 1 + ids
    header = {"swapped": (b, a), "a0": (0, b), "b_beyond": (a, b + 3), "image_missing": None,
              "a_too_large": (a + 2, b), "a_too_small": (a - 2, b), "a_fraction": (a - 0.5, b)}[case]
    d = write_header_last(str(tmp_path / "ds"), images, labels, header)
    if case == "image_missing":
        set_idx_lines(d, [line for line in idx_lines(d) if line.split("\t")[0] != "3"])
    with pytest.raises(RecordIOError) as e:
        image_records(d)
    message = str(e.value)
    assert os.path.join(d, "train.rec") in message or os.path.join(d, "train.idx") in message
    assert "key 0" in message
    if case == "image_missing":
        assert "key 3" in message
    assert cli_error("stats", "--rec", d) == f"face_nms stats: error: {message}"
    assert cli_error("proxy-subset", "--rec", d, "--ratio", "0.5", "--out", str(tmp_path / "p.idx")).endswith(message)
    assert not os.path.exists(tmp_path / "p.idx")


def test_truncated_last_record(faces, tmp_path):
    images, labels = faces
    d = write_records(str(tmp_path / "im2rec"), [(k, float(labels[k]), jpeg(images[k])) for k in range(6)])
    rec = os.path.join(d, "train.rec")
    os.truncate(rec, os.path.getsize(rec) - 10)
    message = cli_error("stats", "--rec", d)
    assert rec in message and "key 5" in message and "truncated" in message
    d = write_header_last(str(tmp_path / "rb"), images, labels)
    rec = os.path.join(d, "train.rec")
    os.truncate(rec, os.path.getsize(rec) - 6)  # inside the header, the last record RecBuilder writes
    message = cli_error("stats", "--rec", d)
    assert rec in message and "key 0" in message and "truncated" in message


def test_duplicate_keys(faces, tmp_path):
    images, labels = faces
    d = write_records(str(tmp_path / "ds"), [(k, float(labels[k]), jpeg(images[k])) for k in range(6)])
    lines = idx_lines(d)
    set_idx_lines(d, lines + [lines[3]])
    message = cli_error("stats", "--rec", d)
    assert os.path.join(d, "train.idx") in message and "key 3" in message and "twice" in message
    set_idx_lines(d, lines[:5] + ["2\t" + lines[5].split("\t")[1]])
    assert "key 2" in cli_error("stats", "--rec", d)
    set_idx_lines(d, lines[:5] + ["7\t" + lines[4].split("\t")[1]])  # two keys, one record
    message = cli_error("stats", "--rec", d)
    assert "keys 4 and 7" in message


@pytest.mark.parametrize("offset", ["beyond", "huge", "negative"])
def test_offsets_outside_the_rec(faces, tmp_path, offset):
    images, labels = faces
    d = write_records(str(tmp_path / "ds"), [(k, float(labels[k]), jpeg(images[k])) for k in range(6)])
    size = os.path.getsize(os.path.join(d, "train.rec"))
    value = {"beyond": str(size + 100), "huge": "99999999999999999999", "negative": "-8"}[offset]
    lines = idx_lines(d)
    set_idx_lines(d, lines[:2] + [f"2\t{value}"] + lines[3:])
    message = cli_error("stats", "--rec", d)
    assert os.path.join(d, "train.idx") in message and "key 2" in message and value in message


def test_empty_payload(faces, tmp_path):
    images, labels = faces
    records = [(k, float(labels[k]), jpeg(images[k])) for k in range(6)]
    records[4] = (4, 1.0, b"")
    d = write_records(str(tmp_path / "ds"), records)
    message = cli_error("stats", "--rec", d)
    assert os.path.join(d, "train.rec") in message and "key 4" in message and "no image" in message
    records[4] = (4, [1.0, 2.0], b"")  # a label array and nothing after it
    d = write_records(str(tmp_path / "arr"), records)
    assert "key 4" in cli_error("stats", "--rec", d)


@pytest.mark.parametrize("label", [-1.0, 1.5, float("nan"), float(2 ** 40), float(2 ** 24), float("inf")])
def test_labels_that_are_no_identity_id(faces, tmp_path, label):
    images, labels = faces
    records = [(k, float(k % 3), jpeg(images[k])) for k in range(6)]
    records[2] = (2, label, records[2][2])
    d = write_records(str(tmp_path / "ds"), records)
    with pytest.raises(RecordIOError) as e:
        read_index(d)
    message = str(e.value)
    assert os.path.join(d, "train.rec") in message and "key 2" in message and f"label {label!r}" in message
    assert cli_error("stats", "--rec", d).endswith(message)


def test_labels_are_int64_end_to_end(faces, tmp_path):
    from plugins.face_nms.demo import TinyNet
    from plugins.face_nms.extract import extract_features
    from plugins.face_nms.features import load_features
    from plugins.face_nms.models import TorchModel
    images, _ = faces
    big = 2 ** 24 - 1  # the largest label a float32 header holds exactly
    d = write_records(str(tmp_path / "ds"), [(k, float(big - k % 2), jpeg(images[k])) for k in range(4)])
    index = read_index(d)
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [big, big - 1, big, big - 1]
    big_images = np.repeat(np.repeat(images[:4], 4, axis=1), 4, axis=2)
    d = write_records(str(tmp_path / "ds112"), [(k, float(big - k % 2), jpeg(big_images[k])) for k in range(4)])
    out = extract_features(d, str(tmp_path / "f"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=4, workers=0,
                           progress=False)
    _, labels, _, _ = load_features(out, d)
    assert labels.dtype == np.int64 and labels.tolist() == [big, big - 1, big, big - 1]


def test_bad_folders_give_one_line(faces, tmp_path):
    images, labels = faces
    good = write_records(str(tmp_path / "good"), [(k, float(labels[k]), jpeg(images[k])) for k in range(6)])
    d = str(tmp_path / "ds")
    shutil.copytree(good, d)
    idx, rec = os.path.join(d, "train.idx"), os.path.join(d, "train.rec")
    open(idx, "w").close()
    assert idx in cli_error("stats", "--rec", d) and "no records" in cli_error("stats", "--rec", d)
    with open(idx, "wb") as f:
        f.write(bytes(range(256)) * 4)
    assert idx in cli_error("stats", "--rec", d)
    set_idx_lines(d, ["0\t0", "", "1\t8"])  # a blank line: mxnet's own reader fails on it too
    assert idx in cli_error("stats", "--rec", d)
    set_idx_lines(d, ["0\t0\t5", "1\t8\t9"])  # three fields a line (a .lst is no .idx)
    assert idx in cli_error("stats", "--rec", d)
    shutil.copy(os.path.join(good, "train.idx"), idx)
    open(rec, "w").close()
    assert rec in cli_error("stats", "--rec", d)
    os.remove(rec)
    assert rec in cli_error("stats", "--rec", d)
    assert "is a file" in cli_error("stats", "--rec", idx)
    assert "not found" in cli_error("stats", "--rec", str(tmp_path / "nowhere"))
    assert "is a file" in cli_error("proxy-subset", "--rec", idx, "--ratio", "0.5", "--out", str(tmp_path / "p.idx"))


def test_more_bad_inputs_of_stats_and_proxy_subset(faces, tmp_path):
    images, labels = faces
    d = write_records(str(tmp_path / "ds"), [(k, float(labels[k]), jpeg(images[k])) for k in range(6)])
    out = str(tmp_path / "p.idx")
    with pytest.raises(SystemExit) as e:  # a bad option value is a usage error: exit 2, one line
        cli(["proxy-subset", "--rec", d, "--ratio", "0.5", "--seed", "-1", "--out", out])
    assert e.value.code == 2
    assert not os.path.exists(out)
    message = cli_error("stats", "--rec", d, "--index", str(tmp_path))
    assert str(tmp_path) in message and "is a folder" in message
    no_lines = str(tmp_path / "one_line.idx")
    with open(no_lines, "wb") as f:
        f.write(b"7" * (3 << 20))  # no line end: refused without holding the whole file
    with pytest.raises(RecordIOError, match="one_line.idx.*not an MXNet index"):
        read_idx(no_lines, chunk_bytes=1 << 20)
    from plugins.face_nms.proxy_subset import random_subset
    with pytest.raises(ValueError, match="labels"):
        random_subset(np.array([0, -1, 2]), 0.5)
