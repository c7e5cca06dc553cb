"""Makes the README's screenshots of the three pages, from the synthetic sets the tests use.

    python docs/img/make_screenshots.py            # writes docs/img/*.png (needs chromium-headless-shell)

A dataset of synthetic faces (identity 3 packed twice, under labels 3 and 24), features of a
fixed pooling model (ONNX), a 60% selection, the conflicts and the overlap with two evaluation
.bin files; each page is rendered by the headless browser and cropped to its first screen.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from plugins.face_nms.__main__ import main  # noqa: E402
from plugins.face_nms.demo import synthetic_faces, write_recordio  # noqa: E402
from plugins.face_nms.extract import extract_features  # noqa: E402
from plugins.face_nms.models import OnnxModel  # noqa: E402

BROWSER = "chromium-headless-shell"


def shoot(page, png, width=1100, height=1000, fragment=""):
    from PIL import Image
    shot = str(png) + ".full.png"
    subprocess.run([shutil.which(BROWSER), "--headless", "--no-sandbox", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--window-size={width},{height}", "--virtual-time-budget=5000",
                    f"--screenshot={shot}", f"file://{page}{fragment}"], check=True, capture_output=True, timeout=120)
    Image.open(shot).convert("RGB").quantize(colors=128).save(png, optimize=True)
    os.remove(shot)
    print(f"wrote {png} ({os.path.getsize(png) // 1024} KB)")


def main_():
    import test_overlap
    work = pathlib.Path(tempfile.mkdtemp(prefix="face_nms_pages_"))

    class Factory:
        def mktemp(self, name):
            p = work / name
            p.mkdir()
            return p
    world = test_overlap.world._get_wrapped_function()(Factory())
    # the conflicts set: the two largest identities each split under a second label, and two faces
    # of one identity labelled as the identity whose center is nearest to theirs
    images, labels, _ = synthetic_faces(n_ids=30, seed=11, burst_every=1000)
    sizes = np.bincount(labels)
    for j, y in enumerate(np.argsort(-sizes, kind="stable")[:2]):
        labels[np.flatnonzero(labels == y)[::2]] = 30 + j
    model = OnnxModel(world.onnx, "cpu")
    import torch
    X = np.asarray(model(torch.from_numpy(images), False), np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    C = np.stack([X[labels == y].mean(0) for y in range(32)])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    S = C @ C.T
    np.fill_diagonal(S, -2)
    S[:, 30:] = S[30:, :] = -2
    a, b = np.unravel_index(np.argmax(S[:30, :30]), (30, 30))
    labels[np.flatnonzero(labels == a)[:2]] = b
    rec = str(work / "split")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=5)
    feats = extract_features(rec, str(work / "split_features"), model, batch_size=64, workers=0, progress=False)
    main(["select", "--features", world.feats, "--rec", world.rec, "--ratio", "0.6", "--device", "cpu",
          "--gallery-ids", "6", "--out", str(work / "train_facenms60.idx")])
    main(["conflicts", "--features", feats, "--rec", rec, "--device", "cpu", "--out", str(work / "conflicts.json")])
    main(["overlap", "--features", world.feats, "--rec", world.rec, "--onnx", world.onnx, "--device", "cpu",
          "--bin", world.lfw, "--bin", world.agedb, "--out", str(work / "overlap.json")])
    page = work / "train_facenms60.html"
    shoot(page, HERE / "selection_page.png", height=1150)
    # the same page from its identities on (the headless screenshot does not scroll to an anchor)
    faces = work / "identities.html"
    faces.write_text(page.read_text().replace("</head>", "<style>table.numbers,.plots{display:none}</style></head>"))
    shoot(faces, HERE / "selection_identities.png", height=700)
    shoot(work / "conflicts.html", HERE / "conflicts_page.png", height=1100)
    shoot(work / "overlap.html", HERE / "overlap_page.png", height=900)
    shutil.rmtree(work)


if __name__ == "__main__":
    main_()
