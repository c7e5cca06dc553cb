"""A dataset changed since extraction or selection is never taken for the recorded one; summaries are checked."""
import json
import logging
import os
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plugins.face_nms.__main__ import main as cli
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.features import load_features
from plugins.face_nms.filter import face_nms_filter
from plugins.face_nms.models import TorchModel
from plugins.face_nms.recordio_index import read_idx, read_index, read_record, write_idx


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    images, labels, _ = synthetic_faces(n_ids=6, seed=4)
    d = str(tmp_path_factory.mktemp("rec"))
    write_recordio(d, images, labels, "im2rec", shuffle_seed=1)
    return d


@pytest.fixture
def rec(original, tmp_path):
    """A private copy of the dataset (its files keep their mtime)."""
    d = str(tmp_path / "ds")
    shutil.copytree(original, d)
    return d


def same_size_jpeg(img, n):
    """A JPEG of ``img`` of exactly ``n`` bytes (a comment segment fills the difference)."""
    import cv2
    for q in range(95, 4, -2):
        b = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), q])[1].tobytes()
        d = n - len(b)
        if d == 0:
            return b
        if d >= 4:
            return b[:2] + b"\xff\xfe" + struct.pack(">H", d - 2) + b"\x00" * (d - 4) + b[2:]
    raise AssertionError(f"no JPEG of {n} bytes")


def rewrite_in_place(rec_dir):
    """Every record's image replaced by another image (the old one upside down) of the same byte size:
    train.idx and train.rec's size unchanged. Returns the mtime train.rec had before."""
    import cv2
    rec, idx = os.path.join(rec_dir, "train.rec"), os.path.join(rec_dir, "train.idx")
    before = (open(idx, "rb").read(), os.path.getsize(rec), os.stat(rec).st_mtime_ns)
    keys, offsets = read_idx(idx)
    with open(rec, "r+b") as f:
        for k, o in zip(keys.tolist(), offsets.tolist()):
            payload = read_record(f, o, rec, k)
            start = 24 + 4 * struct.unpack("<I", payload[:4])[0]
            old = cv2.imdecode(np.frombuffer(payload[start:], np.uint8), cv2.IMREAD_COLOR)
            new = same_size_jpeg(np.ascontiguousarray(old[::-1]), len(payload) - start)
            f.seek(o + 8 + start)
            f.write(new)
    assert open(idx, "rb").read() == before[0] and os.path.getsize(rec) == before[1]
    os.utime(rec, ns=(before[2], before[2] + 10 ** 9))  # a rewrite moves the mtime
    return before[2]


def model():
    torch.set_num_threads(1)
    return TorchModel(TinyNet(seed=0), "cpu")


def extract(rec_dir, out, **kw):
    kw = dict(dict(batch_size=8, workers=0, chunk_rows=16, progress=False), **kw)
    return extract_features(rec_dir, str(out), model(), **kw)


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    message = str(e.value.code)
    assert e.value.code != 0 and "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def cfg_for(rec_dir, **opts):
    cfg = SimpleNamespace(rec=rec_dir, dataset_filter="face_nms", face_nms=opts)
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    return cfg


def run_filter(rec_dir, **opts):
    return face_nms_filter(cfg_for(rec_dir, **opts), SimpleNamespace(imgidx=np.arange(3)))


def test_rewritten_records_refuse_a_resume(rec, tmp_path):
    out = tmp_path / "f"
    assert extract(rec, out, max_chunks=1) is None
    rewrite_in_place(rec)
    with pytest.raises(ValueError, match=r"unfinished extraction of other inputs or settings: "
                                         r"dataset.train_rec_sample_sha256 \([0-9a-f]{12}\.\.\. then, [0-9a-f]{12}"
                                         r"\.\.\. now\); dataset.train_rec_mtime_ns .*--overwrite") as e:
        extract(rec, out)
    assert "\n" not in str(e.value)
    assert not (out / "features.npy").exists()


def test_rewritten_records_refuse_select_filter_overlap_and_gallery(rec, tmp_path, capsys):
    feats = extract(rec, tmp_path / "f")
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--out", idx, "--gallery-ids", "0"])
    assert len(run_filter(rec, index=idx).imgidx) == json.load(open(tmp_path / "sel.json"))["kept"]
    rewrite_in_place(rec)
    msg = cli_error(["select", "--features", feats, "--rec", rec, "--ratio", "0.5", "--out",
                     str(tmp_path / "again.idx")], capsys)
    assert "not extracted from" in msg and "train_rec_sample_sha256" in msg
    assert not (tmp_path / "again.idx").exists()
    with pytest.raises(ValueError, match=r"sel.idx was not selected from .*train_rec_sample_sha256 \("):
        run_filter(rec, index=idx)
    from plugins.face_nms.overlap import run_overlap
    with pytest.raises(ValueError, match=r"not extracted from .*train_rec_sample_sha256"):
        run_overlap(feats, rec, [], str(tmp_path / "overlap.json"), onnx=str(tmp_path / "none.onnx"))
    msg = cli_error(["gallery", "--features", feats, "--rec", rec, "--index", idx, "--out",
                     str(tmp_path / "page.html")], capsys)
    assert "train_rec_sample_sha256" in msg
    msg = cli_error(["stats", "--rec", rec, "--index", idx], capsys)
    assert "sel.idx was not selected from" in msg and "train_rec_sample_sha256" in msg


def test_a_copy_that_changed_only_the_mtime_is_accepted_and_said(rec, tmp_path, capsys, caplog):
    feats = extract(rec, tmp_path / "f")
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--out", idx, "--gallery-ids", "0"])
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    for name in ("train.rec", "train.idx"):
        shutil.copyfile(os.path.join(rec, name), os.path.join(copy, name))  # cp without -p
    os.utime(os.path.join(copy, "train.rec"), ns=(1, 10 ** 18))
    with caplog.at_level(logging.WARNING, logger="face_nms"):
        load_features(feats, copy)
        assert len(run_filter(copy, index=idx).imgidx) == json.load(open(tmp_path / "sel.json"))["kept"]
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and all("train_rec_mtime_ns (" in n and "taken for the same dataset" in n for n in notes)
    # the extraction resumed or reused from the copy: accepted too, and said
    lines = []
    assert extract_features(copy, feats, model(), batch_size=8, workers=0, chunk_rows=16, progress=False,
                            log=lines.append) == feats
    assert "train_rec_mtime_ns" in lines[0] and "already holds these features" in lines[1]


def test_old_records_without_the_new_fields_are_still_read(rec, tmp_path):
    feats = extract(rec, tmp_path / "f")
    meta_path = os.path.join(feats, "meta.json")
    meta = json.load(open(meta_path))
    for k in ("train_rec_sample_sha256", "train_rec_mtime_ns"):
        del meta["provenance"]["dataset"][k]
    json.dump(meta, open(meta_path, "w"))
    load_features(feats, rec)
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--out", idx, "--gallery-ids", "0"])
    assert set(json.load(open(tmp_path / "sel.json"))["dataset"]) == {"train_idx_sha256", "train_rec_bytes",
                                                                      "label_sample"}
    assert len(run_filter(rec, index=idx).imgidx) > 0


@pytest.fixture
def selected(rec, tmp_path):
    feats = extract(rec, tmp_path / "f")
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--out", idx, "--gallery-ids", "0"])
    return SimpleNamespace(rec=rec, feats=feats, idx=idx, summary=str(tmp_path / "sel.json"))


def test_an_index_without_its_summary_needs_trust_index(selected, tmp_path):
    os.remove(selected.summary)
    with pytest.raises(ValueError, match=r"sel.idx has no summary .*sel.json beside it.*trust_index=True") as e:
        run_filter(selected.rec, index=selected.idx)
    assert "\n" not in str(e.value)
    kept = read_idx(selected.idx)[0]
    assert np.array_equal(run_filter(selected.rec, index=selected.idx, trust_index=True).imgidx, kept)
    with pytest.raises(ValueError, match=r"config.face_nms\['trust_index'\] must be True or False, got 'yes'"):
        run_filter(selected.rec, index=selected.idx, trust_index="yes")
    # a summary that records nothing to check against is no better than none
    with open(selected.summary, "w") as f:
        json.dump({"method": "nms"}, f)
    with pytest.raises(ValueError, match=r"sel.json \(the summary of .*sel.idx\) records neither the dataset"):
        run_filter(selected.rec, index=selected.idx)


def test_a_relabelled_dataset_with_the_summary_deleted_is_refused(tmp_path, original):
    images, labels, _ = synthetic_faces(n_ids=6, seed=4)
    relabelled = str(tmp_path / "relabelled")
    write_recordio(relabelled, images, np.random.default_rng(0).permutation(labels), "im2rec", shuffle_seed=1)
    feats = extract(original, tmp_path / "f")
    idx = str(tmp_path / "sel.idx")
    cli(["select", "--features", feats, "--rec", original, "--ratio", "0.6", "--out", idx, "--gallery-ids", "0"])
    os.remove(tmp_path / "sel.json")
    with pytest.raises(ValueError, match=r"has no summary"):
        run_filter(relabelled, index=idx)


BAD_SUMMARIES = [
    ([1, 2], r"the file holds a JSON list, not an object of fields"),
    ("text", r"the file holds a JSON str"),
    ({"kept": "12", "total": 20}, r"field 'kept' is \"12\", not an integer >= 0"),
    ({"kept": 30, "total": 20}, r"field 'kept' is 30, more than 'total' \(20\)"),
    ({"kept": 3, "total": 9, "kept_per_identity_histogram": {"2": "x"}},
     r"field 'kept_per_identity_histogram' has the entry \"2\": \"x\""),
    ({"kept": 3, "total": 9, "kept_per_identity_histogram": [1]}, r"field 'kept_per_identity_histogram' is \[1\]"),
    ({"threshold": "0.5"}, r"field 'threshold' is \"0.5\", not a number or null"),
    ({"dataset": "abc"}, r"field 'dataset' is \"abc\", not an object"),
    ({"dataset": {"train_rec_bytes": "123"}}, r"field 'dataset.train_rec_bytes' is \"123\", not an integer >= 0"),
    ({"dataset": {"train_rec_bytes": -5}}, r"field 'dataset.train_rec_bytes' is -5"),
    ({"dataset": {"train_idx_sha256": 7}}, r"field 'dataset.train_idx_sha256' is 7, not a sha256"),
    ({"dataset": {"label_sample": {"keys": [1], "labels": [2 ** 70]}}},
     r"field 'dataset.label_sample.labels\[0\]' is 1180591620717411303424, not an identity id"),
    ({"dataset": {"label_sample": {"keys": [1], "labels": [3.0]}}},
     r"field 'dataset.label_sample.labels\[0\]' is 3.0, not an identity id"),
    ({"dataset": {"label_sample": {"keys": ["a"], "labels": [3]}}},
     r"field 'dataset.label_sample.keys\[0\]' is \"a\", not an int64 record key"),
    ({"dataset": {"label_sample": {"keys": [1, 2], "labels": [3]}}}, r"field .dataset.label_sample. lists 2 keys and 1 labels"),
    ({"dataset": {"label_sample": [1]}}, r"field 'dataset.label_sample' is \[1\], not an object"),
]


@pytest.mark.parametrize("content,match", BAD_SUMMARIES)
def test_a_summary_of_the_wrong_shape_is_one_line_everywhere(selected, tmp_path, capsys, content, match):
    with open(selected.summary, "w") as f:
        json.dump(content, f)
    where = r"sel.json \(the summary of .*sel.idx\): " + match
    with pytest.raises(ValueError, match=where) as e:
        run_filter(selected.rec, index=selected.idx, trust_index=True)
    assert "\n" not in str(e.value)
    for argv in (["gallery", "--features", selected.feats, "--rec", selected.rec, "--index", selected.idx, "--out",
                  str(tmp_path / "page.html")], ["stats", "--rec", selected.rec, "--index", selected.idx]):
        msg = cli_error(argv, capsys)
        import re
        assert re.search(where, msg), msg
    assert not (tmp_path / "page.html").exists()


def test_counts_that_differ_show_both_sides(selected):
    info = json.load(open(selected.summary))
    del info["dataset"]
    info["total"] += 1
    with open(selected.summary, "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError, match=rf"reports {info['total']} faces, {info['kept']} kept, .*gives "
                                         rf"{info['total'] - 1} faces, {info['kept']} kept"):
        run_filter(selected.rec, index=selected.idx)


def test_labels_that_differ_are_shown_exactly(rec, tmp_path):
    feats = extract(rec, tmp_path / "f")
    labels = np.load(os.path.join(feats, "labels.npy"))
    np.save(os.path.join(feats, "labels.npy"), labels.astype(np.float64) + np.r_[0.5, np.zeros(len(labels) - 1)])
    key = int(np.load(os.path.join(feats, "keys.npy"))[0])
    with pytest.raises(ValueError, match=rf"labels differ for 1 of {len(labels)} rows compared \(record {key}: "
                                         rf"{labels[0]}.5 in labels.npy, {labels[0]} in the dataset\)"):
        load_features(feats, rec)


def test_proxy_subset_writes_the_summary_the_filter_checks(rec, tmp_path, capsys, original):
    out = str(tmp_path / "proxy.idx")
    cli(["proxy-subset", "--rec", rec, "--ratio", "0.5", "--out", out])
    assert sorted(os.listdir(tmp_path)) == ["ds", "proxy.idx", "proxy.json"]
    info = json.load(open(tmp_path / "proxy.json"))
    keys = read_idx(out)[0]
    assert info["kept"] == len(keys) and info["total"] == len(read_index(rec))
    assert info["dataset"]["train_rec_sample_sha256"] and info["dataset"]["label_sample"]["keys"]
    assert np.array_equal(run_filter(rec, index=out).imgidx, keys)
    rewrite_in_place(rec)
    with pytest.raises(ValueError, match=r"proxy.idx was not selected from .*train_rec_sample_sha256"):
        run_filter(rec, index=out)


def test_a_dataset_of_another_layout_is_refused_though_no_field_is_shared():
    from plugins.face_nms.provenance import dataset_differences
    recorded = {"train_idx_sha256": "a" * 64, "train_rec_bytes": 10, "train_rec_sample_sha256": "b" * 64}
    folder = {"layout": "folder", "images": 3, "identities": 1, "file_list_sha256": "c" * 64,
              "content_sample_sha256": "d" * 64}
    refusing, informs = dataset_differences(recorded, None, folder)
    assert informs == [] and any(r.startswith("dataset.train_idx_sha256") for r in refusing), refusing
    assert any(r.startswith("dataset.file_list_sha256") for r in refusing), refusing
