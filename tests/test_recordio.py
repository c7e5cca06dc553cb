import os

import numpy as np
import pytest

from plugins.compat import import_mxnet
from plugins.face_nms.demo import synthetic_faces, write_recordio
from plugins.face_nms.proxy_subset import per_identity_quota
from plugins.face_nms.recordio_index import (RecordIOError, detect_layout, load_filtered_index, read_idx,
                                             read_index, write_idx)

mx = import_mxnet()


@pytest.fixture(scope="module")
def faces():
    return synthetic_faces(n_ids=12, seed=1)


@pytest.fixture(scope="module", params=["insightface", "im2rec"])
def dataset(request, faces, tmp_path_factory):
    images, labels, _ = faces
    d = tmp_path_factory.mktemp(request.param)
    keys = write_recordio(str(d), images, labels, request.param, shuffle_seed=5)
    return str(d), request.param, keys, labels


def mx_labels(rec_dir, keys):
    """Labels as mxnet itself reads them (the host's MXFaceDataset way)."""
    r = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
    out = []
    for k in keys:
        header, _ = mx.recordio.unpack(r.read_idx(int(k)))
        lab = header.label
        out.append(int(lab if np.isscalar(lab) else lab[0]))
    return np.array(out)


def test_index_matches_mxnet_reader(dataset):
    rec_dir, layout, keys, labels = dataset
    index = read_index(rec_dir, chunk=7)  # several header chunks
    assert index.layout == layout
    assert len(index) == len(labels)
    assert sorted(index.keys.tolist()) == sorted(keys.tolist())
    assert np.array_equal(index.labels, mx_labels(rec_dir, index.keys))
    by_key = dict(zip(keys.tolist(), labels.tolist()))
    assert [by_key[k] for k in index.keys.tolist()] == index.labels.tolist()
    all_keys, all_offsets = read_idx(os.path.join(rec_dir, "train.idx"))
    off = dict(zip(all_keys.tolist(), all_offsets.tolist()))
    assert [off[k] for k in index.keys.tolist()] == index.offsets.tolist()
    if layout == "insightface":
        assert index.keys.min() == 1 and index.keys.max() == len(labels)  # header and identity records left out
        assert detect_layout(rec_dir) == ("insightface", len(labels) + 1)


def test_flag_labels_are_read(tmp_path):
    """Records whose label is an array (flag > 0, as im2rec writes from a .lst) give its first value."""
    rec, idx = str(tmp_path / "train.rec"), str(tmp_path / "train.idx")
    w = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    for k in range(5):
        w.write_idx(k, mx.recordio.pack(mx.recordio.IRHeader(2, [float(k % 3), 7.0], k, 0), b"\xff\xd8jpegbytes"))
    w.close()
    index = read_index(str(tmp_path))
    assert index.layout == "im2rec"
    assert index.labels.tolist() == [0, 1, 2, 0, 1]


def test_filtered_index_round_trip_and_atomic_write(dataset, tmp_path):
    rec_dir, _, _, _ = dataset
    index = read_index(rec_dir)
    rows = np.arange(0, len(index), 3)
    path = str(tmp_path / "kept.idx")
    write_idx(path, index.keys[rows], index.offsets[rows])
    assert sorted(os.listdir(tmp_path)) == ["kept.idx"]
    assert np.array_equal(load_filtered_index(path, rec_dir), index.keys[rows])
    # mxnet reads the filtered index file and finds the same records
    r = mx.recordio.MXIndexedRecordIO(path, os.path.join(rec_dir, "train.rec"), "r")
    assert list(r.keys) == index.keys[rows].tolist()
    header, _ = mx.recordio.unpack(r.read_idx(int(index.keys[rows[1]])))
    assert int(np.atleast_1d(header.label)[0]) == index.labels[rows[1]]


def test_inputs_are_never_modified(dataset, tmp_path):
    rec_dir, _, _, _ = dataset
    before = {n: os.path.getmtime(os.path.join(rec_dir, n)) for n in ("train.rec", "train.idx")}
    index = read_index(rec_dir)
    write_idx(str(tmp_path / "x.idx"), index.keys[:3], index.offsets[:3])
    assert before == {n: os.path.getmtime(os.path.join(rec_dir, n)) for n in ("train.rec", "train.idx")}


def test_mismatched_filtered_index_is_refused(dataset, tmp_path):
    rec_dir, _, _, _ = dataset
    index = read_index(rec_dir)
    bad = str(tmp_path / "bad.idx")
    write_idx(bad, index.keys[:3], index.offsets[:3] + 4)  # another packing
    with pytest.raises(RecordIOError, match="does not belong"):
        load_filtered_index(bad, rec_dir)
    write_idx(bad, [10 ** 9], [0])  # a key that is not in train.idx
    with pytest.raises(RecordIOError, match="bad.idx"):
        load_filtered_index(bad, rec_dir)
    with pytest.raises(RecordIOError, match="not found"):
        load_filtered_index(str(tmp_path / "missing.idx"), rec_dir)


def test_bad_recordio_inputs(tmp_path, dataset):
    rec_dir, _, _, _ = dataset
    with pytest.raises(RecordIOError, match="train.rec"):
        read_index(str(tmp_path))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.rec").write_bytes(open(os.path.join(rec_dir, "train.rec"), "rb").read()[:5000])
    (broken / "train.idx").write_text(open(os.path.join(rec_dir, "train.idx")).read())
    with pytest.raises(RecordIOError, match="past the end|truncated"):
        read_index(str(broken))
    (broken / "train.rec").write_bytes(b"\0" * os.path.getsize(os.path.join(rec_dir, "train.rec")))
    with pytest.raises(RecordIOError, match="no RecordIO record"):
        read_index(str(broken))
    (broken / "train.idx").write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match="not an MXNet index"):
        read_index(str(broken))
    (broken / "train.idx").write_text("")
    with pytest.raises(RecordIOError, match="empty"):
        read_index(str(broken))


def test_large_idx_parses_in_chunks(tmp_path):
    keys = np.arange(200_000) * 3
    offsets = np.arange(200_000) * 1000
    path = str(tmp_path / "big.idx")
    write_idx(path, keys, offsets, chunk=7919)
    k, o = read_idx(path, chunk_bytes=4096)
    assert np.array_equal(k, keys) and np.array_equal(o, offsets)


def test_proxy_subset_cli(dataset, tmp_path, capsys):
    from plugins.face_nms.__main__ import main
    rec_dir, _, _, labels = dataset
    out = str(tmp_path / "proxy.idx")
    main(["proxy-subset", "--rec", rec_dir, "--ratio", "0.3", "--seed", "2", "--out", out])
    kept = load_filtered_index(out, rec_dir)
    index = read_index(rec_dir)
    kept_labels = index.labels[np.isin(index.keys, kept)]
    assert np.array_equal(np.bincount(kept_labels, minlength=labels.max() + 1),
                          per_identity_quota(np.bincount(index.labels), 0.3))
    again = str(tmp_path / "again.idx")
    main(["proxy-subset", "--rec", rec_dir, "--ratio", "0.3", "--seed", "2", "--out", again])
    assert open(out).read() == open(again).read()
    main(["stats", "--rec", rec_dir, "--index", out])
    printed = capsys.readouterr().out
    assert f"num_image    {len(kept)}" in printed
    with pytest.raises(SystemExit):
        main(["proxy-subset", "--rec", rec_dir, "--ratio", "1.5", "--out", out])


def test_atomic_output_keeps_the_old_file_and_no_temporary_on_failure(tmp_path):
    from plugins.face_nms.files import atomic_output
    path = tmp_path / "train_facenms60.idx"
    path.write_text("0\t0\n")
    with pytest.raises(RuntimeError):
        with atomic_output(str(path)) as tmp, open(tmp, "w") as f:
            f.write("1\t24\n")
            raise RuntimeError("interrupted")
    assert path.read_text() == "0\t0\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_facenms60.idx"]
    with atomic_output(str(path)) as tmp, open(tmp, "w") as f:
        f.write("1\t24\n")
    assert path.read_text() == "1\t24\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_facenms60.idx"]
