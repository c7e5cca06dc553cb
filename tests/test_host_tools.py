"""The host's own mxnet tools, run as they are (nothing imported before them) in this environment:
insightface's RecBuilder, arcface_torch's scripts/shuffle_rec.py, eval/verification.load_bin, onnx_ijbc.py."""
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from plugins.compat import import_mxnet
from plugins.face_nms.demo import synthetic_faces
from plugins.face_nms.recordio_index import read_index

INSIGHTFACE_DIR = os.environ.get("INSIGHTFACE_DIR")
if not INSIGHTFACE_DIR:
    pytest.skip("INSIGHTFACE_DIR is not set: these tests run the host's mxnet tools "
                "(INSIGHTFACE_DIR=/path/to/insightface python -m pytest tests)", allow_module_level=True)
HOST_AT = os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_torch")
REC_BUILDER = os.path.join(INSIGHTFACE_DIR, "recognition", "arcface_mxnet", "common", "rec_builder.py")


def run(argv, cwd):
    """argv run by this environment's Python, as a user would: no PYTHONPATH, no bytecode written into the host."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def faces():
    images, labels, _ = synthetic_faces(n_ids=4, seed=5, size=112)
    return images, labels


@pytest.fixture(scope="module")
def packed(faces, tmp_path_factory):
    """A dataset packed by insightface's RecBuilder (a copy of rec_builder.py, run with nothing imported first)."""
    tmp = tmp_path_factory.mktemp("recbuilder")
    shutil.copy(REC_BUILDER, tmp)
    images, labels = faces
    np.save(str(tmp / "images.npy"), images)
    np.save(str(tmp / "labels.npy"), labels)
    d = str(tmp / "ds")
    out = run(["-c", textwrap.dedent(f"""
        import numpy as np
        from rec_builder import RecBuilder
        images, labels = np.load("images.npy"), np.load("labels.npy")
        b = RecBuilder({d!r}, image_size=(112, 112))
        for lab in np.unique(labels):
            b.add(int(lab), [img[:, :, ::-1] for img in images[labels == lab]])  # RecBuilder takes BGR
        b.close()
        b.writer.close()
        """)], cwd=str(tmp))
    return d, out


def records(rec_dir):
    """{key: (header, payload)} of every record, read with mxnet."""
    mx = import_mxnet()
    r = mx.recordio.MXIndexedRecordIO(os.path.join(rec_dir, "train.idx"), os.path.join(rec_dir, "train.rec"), "r")
    out = {k: mx.recordio.unpack(r.read_idx(k)) for k in r.keys}
    r.close()
    return out


def test_rec_builder_packs_the_images(faces, packed):
    import cv2
    images, labels = faces
    d, out = packed
    n, ids = len(labels), len(np.unique(labels))
    assert f"id0: ({n + 1}, {n + 1 + ids})" in out
    recs = records(d)
    assert sorted(recs) == list(range(n + 1 + ids))
    assert recs[0][0].label.tolist() == [n + 1, n + 1 + ids]
    for k in range(1, n + 1):
        header, payload = recs[k]
        assert header.label == labels[k - 1]
        # what mxnet's pack_img writes: OpenCV's JPEG at quality 95 of the BGR image
        assert payload == cv2.imencode(".jpg", images[k - 1][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    index = read_index(d)
    assert index.layout == "insightface" and index.labels.tolist() == labels.tolist()
    with open(os.path.join(d, "property")) as f:
        assert f.read() == f"{ids},112,112\n"


def test_shuffle_rec_rewrites_every_image(faces, packed):
    _, labels = faces
    d, _ = packed
    out = run([os.path.join(HOST_AT, "scripts", "shuffle_rec.py"), d], cwd=os.path.dirname(d))
    assert out.strip().splitlines()[-1] == str(len(labels))
    source = records(d)
    shuffled = records(os.path.join(os.path.dirname(d), "shuffled_ds"))
    assert sorted(shuffled) == list(range(len(labels)))
    got = sorted((float(h.label), p) for h, p in shuffled.values())
    assert got == sorted((float(source[k][0].label), source[k][1]) for k in range(1, len(labels) + 1))


def test_verification_load_bin_reads_a_bin_packed_as_the_host_does(faces, tmp_path):
    import cv2
    images, _ = faces
    pairs = images[:8]
    bins = [cv2.imencode(".png", img[:, :, ::-1])[1].tobytes() for img in pairs]  # lossless: compared exactly
    issame = [True, False, True, False]
    with open(tmp_path / "lfw.bin", "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    out = run(["-c", textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {HOST_AT!r})
        from eval.verification import load_bin
        data, issame = load_bin({str(tmp_path / "lfw.bin")!r}, (112, 112))
        np.savez({str(tmp_path / "loaded.npz")!r}, plain=data[0].numpy(), flipped=data[1].numpy(), issame=issame)
        """)], cwd=str(tmp_path))
    assert "loading bin 0" in out
    loaded = np.load(tmp_path / "loaded.npz")
    chw = pairs.transpose(0, 3, 1, 2).astype(np.float32)
    assert loaded["issame"].tolist() == issame
    assert np.array_equal(loaded["plain"], chw)
    assert np.array_equal(loaded["flipped"], chw[:, :, :, ::-1])


def test_onnx_ijbc_imports_and_parses_its_arguments():
    out = run([os.path.join(HOST_AT, "onnx_ijbc.py"), "--help"], cwd=HOST_AT)
    assert "--target" in out and "--model-root" in out
