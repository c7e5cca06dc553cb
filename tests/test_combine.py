"""Decisions combined: the training filter's list of indexes and ``combine``, the records in every index."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from test_cli import cli, one_line

from plugins.face_nms.__main__ import main
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel
from plugins.face_nms.filter import check_index_dataset, face_nms_filter
from plugins.face_nms.recordio_index import RecordIOError, image_records, read_idx, read_index, write_idx
from plugins.registry import apply_dataset_filter


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A dataset written by mxnet, its features, a selection, a conflicts drop, a proxy subset; another dataset."""
    root = tmp_path_factory.mktemp("combine")
    images, labels, _ = synthetic_faces(n_ids=16, seed=3)
    labels[np.flatnonzero(labels == 2)[::2]] = 16
    rec = str(root / "ds")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=2)
    feats = extract_features(rec, str(root / "feats"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=64,
                             workers=0, progress=False)
    sel, noc, proxy = (str(root / n) for n in ("sel.idx", "noconflicts.idx", "proxy.idx"))
    main(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--device", "cpu", "--gallery-ids", "0",
          "--out", sel])
    main(["conflicts", "--features", feats, "--rec", rec, "--out", str(root / "c.json"), "--device", "cpu",
          "--drop", noc, "--drop-mode", "faces"])
    main(["proxy-subset", "--rec", rec, "--ratio", "0.8", "--seed", "1", "--out", proxy])
    other = str(root / "other")
    o_images, o_labels, _ = synthetic_faces(n_ids=5, seed=9)
    write_recordio(other, o_images, o_labels, "insightface")
    foreign = str(root / "foreign.idx")
    main(["proxy-subset", "--rec", other, "--ratio", "0.5", "--out", foreign])
    return SimpleNamespace(root=root, rec=rec, feats=feats, indexes=[sel, noc, proxy], foreign=foreign)


class Records:
    """What the filter changes of the host's MXFaceDataset: its list of record keys."""

    def __init__(self):
        self.imgidx = np.arange(5)

    def __len__(self):
        return len(self.imgidx)


def config(ds, index, output):
    cfg = SimpleNamespace(rec=ds.rec, dataset_filter="face_nms", face_nms=dict(index=index), output=str(output))
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    return cfg


def summarised(ds, path, rows):
    """A filtered index of ``rows`` of the image records with the summary a face_nms command writes."""
    from plugins.face_nms.provenance import dataset_provenance
    from plugins.face_nms.recordio_index import read_index
    from plugins.face_nms.report import index_summary
    index = read_index(ds.rec)
    keep = np.zeros(len(index), bool)
    keep[rows] = True
    write_idx(path, index.keys[keep], index.offsets[keep])
    dataset = dict(dataset_provenance(ds.rec))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(index_summary(index.labels, keep, index.keys, dataset, method="test"), f)
    return path


def intersection(ds, paths):
    """Keys and offsets of the dataset's image records in every index, in train.idx order."""
    _, keys, offsets = image_records(ds.rec)
    keep = np.logical_and.reduce([np.isin(keys, read_idx(p)[0]) for p in paths])
    return keys[keep], offsets[keep]


def test_the_filter_trains_on_the_records_in_every_index(ds, tmp_path):
    cfg = config(ds, list(ds.indexes), tmp_path)
    dataset = apply_dataset_filter(cfg, Records())
    keys, offsets = intersection(ds, ds.indexes)
    sizes = [len(read_idx(p)[0]) for p in ds.indexes]
    assert 0 < len(keys) < min(sizes)  # each index removes records the others keep
    assert np.array_equal(dataset.imgidx, keys) and cfg.num_image == len(keys)
    # written once, for DALI: the combined index and its summary
    assert cfg.train_idx == str(tmp_path / "train_combined.idx")
    got_keys, got_offsets = read_idx(cfg.train_idx)
    assert np.array_equal(got_keys, keys) and np.array_equal(got_offsets, offsets)
    summary = json.load(open(tmp_path / "train_combined.json"))
    total = len(read_index(ds.rec))
    assert summary["kept"] == len(keys) and summary["total"] == total
    assert [s["index"] for s in summary["sources"]] == [os.path.abspath(p) for p in ds.indexes]
    assert [s["removed"] for s in summary["sources"]] == [total - n for n in sizes]
    for i, s in enumerate(summary["sources"]):
        others = [p for j, p in enumerate(ds.indexes) if j != i]
        alone = len(intersection(ds, others)[0]) - len(keys)
        assert s["removed_by_it_alone"] == alone
    assert sorted(os.listdir(tmp_path)) == ["train_combined.idx", "train_combined.json"]
    # the combined index is itself an index the filter accepts
    check_index_dataset(cfg.train_idx, ds.rec, got_keys)
    again = config(ds, cfg.train_idx, tmp_path / "x")
    assert np.array_equal(face_nms_filter(again, SimpleNamespace(imgidx=None)).imgidx, keys)


def test_a_list_of_one_index_is_that_index(ds, tmp_path):
    cfg = config(ds, [ds.indexes[0]], tmp_path)
    dataset = face_nms_filter(cfg, SimpleNamespace(imgidx=None))
    assert np.array_equal(dataset.imgidx, read_idx(ds.indexes[0])[0])


def test_every_index_of_the_list_is_checked(ds, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RecordIOError, match="foreign.idx does not belong to"):
        face_nms_filter(config(ds, [ds.indexes[0], ds.foreign], out), SimpleNamespace(imgidx=None))
    with pytest.raises(RecordIOError, match="none.idx not found"):
        face_nms_filter(config(ds, ds.indexes[:2] + [str(tmp_path / "none.idx")], out), SimpleNamespace(imgidx=None))
    # an index whose summary records another dataset: the same keys, another train.idx digest
    moved = tmp_path / "sel.idx"
    shutil.copy(ds.indexes[0], moved)
    info = json.load(open(os.path.splitext(ds.indexes[0])[0] + ".json"))
    info["dataset"]["train_idx_sha256"] = "0" * 64
    json.dump(info, open(tmp_path / "sel.json", "w"))
    with pytest.raises(RecordIOError, match=f"filtered index {moved} was not selected from"):
        face_nms_filter(config(ds, [ds.indexes[1], str(moved)], out), SimpleNamespace(imgidx=None))
    # disjoint indexes: nothing to train on
    _, keys, offsets = image_records(ds.rec)
    n = len(keys)
    a, b = summarised(ds, str(tmp_path / "a.idx"), np.arange(0, n, 2)), summarised(ds, str(tmp_path / "b.idx"),
                                                                                  np.arange(1, n, 2))
    with pytest.raises(RecordIOError, match="have no record in common"):
        face_nms_filter(config(ds, [a, b], out), SimpleNamespace(imgidx=None))
    with pytest.raises(ValueError, match="lists .*sel.idx twice"):
        face_nms_filter(config(ds, [ds.indexes[0], ds.indexes[0]], out), SimpleNamespace(imgidx=None))
    with pytest.raises(ValueError, match="give one or more paths"):
        face_nms_filter(config(ds, [], out), SimpleNamespace(imgidx=None))
    # an index the combined one would replace
    clash = tmp_path / "clash"
    clash.mkdir()
    shutil.copy(ds.indexes[2], clash / "train_combined.idx")
    with pytest.raises(ValueError, match="would replace"):
        face_nms_filter(config(ds, [ds.indexes[0], str(clash / "train_combined.idx")], clash),
                        SimpleNamespace(imgidx=None))
    assert not out.exists() and sorted(os.listdir(clash)) == ["train_combined.idx"]


def test_combine_command_writes_what_the_filter_trains_on(ds, tmp_path, capsys):
    out = str(tmp_path / "clean.idx")
    argv = ["combine", "--rec", ds.rec, "--out", out]
    for p in ds.indexes:
        argv += ["--index", p]
    status, err = cli(argv, capsys)
    assert status == 0, err
    keys, offsets = intersection(ds, ds.indexes)
    got_keys, got_offsets = read_idx(out)
    assert np.array_equal(got_keys, keys) and np.array_equal(got_offsets, offsets)
    summary = json.load(open(tmp_path / "clean.json"))
    assert summary["kept"] == len(keys) and len(summary["sources"]) == 3
    assert summary["dataset"]["label_sample"]["keys"]
    # accepted by the training filter (checked against config.rec by its summary)
    cfg = config(ds, out, tmp_path / "run")
    assert np.array_equal(face_nms_filter(cfg, SimpleNamespace(imgidx=None)).imgidx, keys)
    # and shown by gallery
    page = str(tmp_path / "clean.html")
    status, err = cli(["gallery", "--rec", ds.rec, "--features", ds.feats, "--index", out, "--gallery-ids", "3",
                       "--out", page], capsys)
    assert status == 0, err
    text = open(page).read()
    assert f"faces kept</th><td>{len(keys):,}<" in text and "combined from" in text
    assert all(os.path.basename(p) in text for p in ds.indexes)
    assert sorted(os.listdir(tmp_path)) == ["clean.html", "clean.idx", "clean.json"]


def test_combine_command_errors_are_one_line(ds, tmp_path, capsys):
    out = str(tmp_path / "c.idx")
    sel, noc, _ = ds.indexes

    def combine(*indexes, out=out, rec=None):
        argv = ["combine", "--rec", rec or ds.rec, "--out", out]
        for p in indexes:
            argv += ["--index", p]
        return cli(argv, capsys)
    one_line(*combine(sel, ds.foreign), 1, "foreign.idx", "does not belong", "select again")
    one_line(*combine(sel, str(tmp_path / "none.idx")), 1, "--index", "none.idx", "not found")
    _, keys, offsets = image_records(ds.rec)
    n = len(keys)
    a, b = summarised(ds, str(tmp_path / "a.idx"), np.arange(0, n, 2)), summarised(ds, str(tmp_path / "b.idx"),
                                                                                  np.arange(1, n, 2))
    one_line(*combine(a, b), 1, "a.idx", "b.idx", "no record in common")
    one_line(*combine(sel), 2, "two or more --index")
    one_line(*combine(sel, sel), 2, "--index", "given twice")
    one_line(*combine(sel, noc, out=sel), 2, "--out", "replace an input")
    one_line(*combine(sel, noc, out=os.path.splitext(noc)[0] + ".idx"), 2, "replace an input")
    one_line(*combine(a, noc, out=str(tmp_path / "a.json")), 2, "--out", "name the combined index .idx")
    one_line(*combine(sel, noc, out=str(tmp_path / "no" / "c.idx")), 1, "does not exist")
    one_line(*combine(sel, str(tmp_path)), 1, "--index", "folder")
    one_line(*combine(sel, noc, rec=str(tmp_path / "a.idx")), 1, "--rec", "is a file")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "c.json")
