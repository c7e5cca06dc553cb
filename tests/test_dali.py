"""DALI's mxnet reader on filtered indexes: the kept records, their labels and images, in index order.

Runs where nvidia-dali-cuda120 is installed (CPU pipelines, no GPU needed); skipped with the reason otherwise.
"""
import os
import sys

import numpy as np
import pytest

pytest.importorskip("nvidia.dali", reason="nvidia-dali-cuda120 is not installed: pip install nvidia-dali-cuda120")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

from plugins.compat import import_mxnet  # noqa: E402
from plugins.face_nms.demo import synthetic_faces, write_recordio  # noqa: E402
from plugins.face_nms.proxy_subset import random_subset  # noqa: E402
from plugins.face_nms.recordio_index import load_filtered_index, read_index, write_idx  # noqa: E402

INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")


def write_with_rec_builder(rec_dir, images, labels):
    """insightface's RecBuilder (arcface_mxnet/common/rec_builder.py): images, identity records, header key 0 last."""
    import cv2
    import_mxnet()
    sys.path.insert(0, os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_mxnet", "common"))
    try:
        from rec_builder import RecBuilder
    finally:
        sys.path.pop(0)
    builder = RecBuilder(rec_dir)
    for label in np.unique(labels):
        builder.add(int(label), [cv2.imencode(".jpg", img[:, :, ::-1])[1].tobytes()
                                 for img in images[labels == label]])
    builder.close()
    builder.writer.close()


@pytest.fixture(scope="module", params=["insightface", "im2rec", "rec_builder"])
def filtered(request, tmp_path_factory):
    """(rec_dir, filtered .idx, kept keys, kept labels): every other face of each identity, in index order."""
    images, labels, _ = synthetic_faces(n_ids=6, seed=2)
    rec_dir = str(tmp_path_factory.mktemp(request.param))
    if request.param == "rec_builder":
        if not INSIGHTFACE_DIR:
            pytest.skip("INSIGHTFACE_DIR is not set: the RecBuilder layout is written by insightface's own code")
        write_with_rec_builder(rec_dir, images, labels)
    else:
        write_recordio(rec_dir, images, labels, request.param, shuffle_seed=3)
    index = read_index(rec_dir)
    rows = random_subset(index.labels, 0.5, seed=1)
    path = write_idx(os.path.join(rec_dir, "kept.idx"), index.keys[rows], index.offsets[rows])
    assert np.array_equal(load_filtered_index(path, rec_dir), index.keys[rows])
    return rec_dir, path, index.keys[rows], index.labels[rows]


def dali_read(rec_dir, index_path, n):
    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpegs, labels = fn.readers.mxnet(path=[os.path.join(rec_dir, "train.rec")], index_path=[index_path],
                                         random_shuffle=False, name="reader")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    p = pipe()
    p.build()
    images, labels = p.run()
    return p.epoch_size("reader"), [np.array(images[i]) for i in range(n)], [np.array(labels[i]) for i in range(n)]


def test_dali_reads_exactly_the_kept_records_in_index_order(filtered):
    rec_dir, path, keys, labels = filtered
    mx = import_mxnet()
    size, images, dali_labels = dali_read(rec_dir, path, len(keys))
    assert size == len(keys)
    assert [float(np.ravel(lab)[0]) for lab in dali_labels] == labels.astype(float).tolist()
    r = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
    for key, img in zip(keys, images):
        _, payload = mx.recordio.unpack(r.read_idx(int(key)))
        ref = mx.image.imdecode(payload).asnumpy()  # RGB, as the host's MXFaceDataset decodes
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - ref.astype(int)).mean() < 1.0


def test_dali_reads_the_combined_index_of_the_training_filter(tmp_path):
    """config.face_nms = dict(index=[a, b]): DALI's reader reads cfg.train_idx, the records in both."""
    from types import SimpleNamespace

    from plugins.face_nms.filter import face_nms_filter
    images, labels, _ = synthetic_faces(n_ids=6, seed=2)
    rec_dir = str(tmp_path / "ds")
    write_recordio(rec_dir, images, labels, "im2rec", shuffle_seed=3)
    index = read_index(rec_dir)
    paths, masks = [], []
    for seed in (1, 2):
        rows = random_subset(index.labels, 0.7, seed=seed)
        paths.append(write_idx(str(tmp_path / f"r{seed}.idx"), index.keys[rows], index.offsets[rows]))
        masks.append(np.isin(index.keys, index.keys[rows]))
    keep = masks[0] & masks[1]
    cfg = SimpleNamespace(rec=rec_dir, face_nms=dict(index=paths), output=str(tmp_path / "run"),
                          dataset_filter="face_nms")
    cfg.get = lambda k, d=None: getattr(cfg, k, d)
    face_nms_filter(cfg, SimpleNamespace(imgidx=None))
    size, images_read, dali_labels = dali_read(rec_dir, cfg.train_idx, int(keep.sum()))
    assert size == int(keep.sum()) < min(len(m.nonzero()[0]) for m in masks)
    assert [float(np.ravel(lab)[0]) for lab in dali_labels] == index.labels[keep].astype(float).tolist()
    assert all(img.shape == (112, 112, 3) for img in images_read)
