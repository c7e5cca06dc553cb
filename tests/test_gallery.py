"""The gallery page: what a selection keeps and drops, each dropped face beside its suppressor."""
import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_cli import cli, one_line
from test_outputs import _write_in_child

from plugins.face_nms.__main__ import main
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel
from plugins.face_nms.gallery import PER_IDENTITY, THUMB, build_page, pick_identities
from plugins.face_nms.recordio_index import read_idx, read_index
from plugins.face_nms.suppressors import find_suppressors, histogram_identities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSER = "chromium-headless-shell"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset written by mxnet, its features, a selection (with its page) and a proxy subset."""
    root = tmp_path_factory.mktemp("gallery")
    images, labels, _ = synthetic_faces(n_ids=14, seed=5)
    rec = str(root / "ds")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=1)
    feats = extract_features(rec, str(root / "feats"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=32,
                             workers=0, progress=False)
    sel = str(root / "sel.idx")
    main(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--device", "cpu", "--gallery-ids", "7",
          "--out", sel])
    proxy = str(root / "proxy.idx")
    main(["proxy-subset", "--rec", rec, "--ratio", "0.5", "--out", proxy])
    return {"root": str(root), "rec": rec, "feats": feats, "sel": sel, "proxy": proxy}


def parse(page):
    """{label: (attributes, [pair attributes])} of the identity sections, and the histogram's attributes."""
    sections = {}
    for m in re.finditer(r"<section class='identity'([^>]*)>(.*?)</section>", page, re.S):
        attrs = dict(re.findall(r"data-([\w-]+)='([^']*)'", m.group(1)))
        pairs = [dict(re.findall(r"data-([\w-]+)='([^']*)'", p))
                 for p in re.findall(r"<figure class='pair'([^>]*)>", m.group(2))]
        kept = re.findall(r"<figure class='face' data-key='(\d+)'>", m.group(2))
        sections[int(attrs["label"])] = (attrs, pairs, [int(k) for k in kept], m.group(2))
    hist = dict(re.findall(r"data-([\w-]+)='([^']*)'", re.search(r"<figure id='suppressor-histogram'([^>]*)>",
                                                                 page).group(1)))
    return sections, hist


def truth(data, index):
    """(keys, labels, normalised float64 features, kept mask) of the dataset's rows, kept by ``index``."""
    full = read_index(data["rec"])
    keys = np.load(os.path.join(data["feats"], "keys.npy"))
    assert np.array_equal(keys, full.keys)
    X = np.load(os.path.join(data["feats"], "features.npy")).astype(np.float64)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return keys, full.labels, X, np.isin(keys, read_idx(index)[0])


def ranks(X, labels):
    """Rank position of every row within its identity, as select's hard-first ranking orders them."""
    from plugins.face_nms.nms import Ranker
    pos = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        _, ranked = Ranker("hard-first", device="cpu").rank(X[rows][None], rows[None], np.array([label]),
                                                            pairwise=False)
        pos[ranked[0].numpy()] = np.arange(len(rows))
    return pos


def check_page(data, index, page, ids, threshold, ranked=False):
    keys, labels, X, kept = truth(data, index)
    pos = ranks(X, labels)
    row = {int(k): i for i, k in enumerate(keys)}
    sections, hist = parse(page)
    assert sorted(sections) == sorted(lab for lab, _ in pick_identities(labels, kept, ids))
    assert len(sections) == ids
    for label, (attrs, pairs, kept_keys, body) in sections.items():
        rows = np.flatnonzero(labels == label)
        n_kept, n_dropped = int(kept[rows].sum()), int((~kept[rows]).sum())
        assert (int(attrs["faces"]), int(attrs["kept"]), int(attrs["dropped"])) == (len(rows), n_kept, n_dropped)
        assert len(kept_keys) == min(n_kept, PER_IDENTITY) and len(pairs) == min(n_dropped, PER_IDENTITY)
        assert all(kept[row[k]] and labels[row[k]] == label for k in kept_keys)
        if n_dropped > PER_IDENTITY:
            assert f"+{n_dropped - PER_IDENTITY} more dropped" in body
        k_rows = rows[kept[rows]]
        for p in pairs:
            d, s = row[int(p["key"])], row[int(p["suppressor-key"])]
            assert labels[d] == label and not kept[d]
            assert labels[s] == label and kept[s]
            cos = X[d] @ X[s]
            assert abs(float(p["cosine"]) - cos) < 1e-5, (p, cos)
            if ranked:  # the most similar kept face ranked before the dropped one
                before = k_rows[pos[k_rows] < pos[d]]
                assert pos[s] < pos[d] and cos >= (X[before] @ X[d]).max() - 1e-6
            else:  # the nearest kept face
                assert cos >= (X[k_rows] @ X[d]).max() - 1e-6
            if threshold is not None:
                assert float(p["cosine"]) > threshold
    # a small dataset: the histogram takes every dropped face
    assert int(hist["faces"]) == int((~kept).sum())
    assert ("threshold" in hist) == (threshold is not None)
    if threshold is not None:
        assert float(hist["threshold"]) == threshold
    # self-contained: images are data: URIs, nothing is fetched
    assert re.findall(r"<img [^>]*src='([^:']*):", page) and set(re.findall(r"<img [^>]*src='([^:']*):", page)) \
        == {"data"}
    assert "<script" not in page and "<link" not in page and not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page)
    return sections


def test_select_writes_the_page_with_counts_and_suppressor_cosines(data):
    info = json.load(open(os.path.splitext(data["sel"])[0] + ".json"))
    page = open(os.path.splitext(data["sel"])[0] + ".html").read()
    assert info["method"] == "nms"
    sections = check_page(data, data["sel"], page, 7, info["threshold"], ranked=True)
    assert any(int(a["dropped"]) for a, *_ in sections.values())
    assert f"{info['kept']}" in page and "hard-first" in page
    # the suppressor's cosine of every dropped face is above the threshold (what NMS acted on)
    keys, labels, X, kept = truth(data, data["sel"])
    feats = np.load(os.path.join(data["feats"], "features.npy"), mmap_mode="r")
    from plugins.face_nms.nms import Ranker
    sup = find_suppressors(feats, labels, kept, np.unique(labels), ranker=Ranker("hard-first", device="cpu"))
    assert np.array_equal(sup.rows, np.flatnonzero(~kept))
    assert np.all(sup.cosine > info["threshold"]) and np.all(kept[sup.suppressor])
    assert sup.cosine.dtype == np.float32
    pos = ranks(X, labels)
    assert np.all(pos[sup.suppressor] < pos[sup.rows])
    nearest = find_suppressors(feats, labels, kept, np.unique(labels))
    assert np.all(nearest.cosine >= sup.cosine)


def test_gallery_command_on_a_proxy_subset_and_on_a_selection(data, capsys, tmp_path):
    out = str(tmp_path / "proxy.html")
    assert main(["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", data["proxy"],
                 "--gallery-ids", "5", "--out", out]) is None
    assert "no threshold" in capsys.readouterr().out
    check_page(data, data["proxy"], open(out).read(), 5, None)
    # a selection: the threshold comes from its summary
    out = str(tmp_path / "sel.html")
    main(["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", data["sel"], "--out", out])
    threshold = json.load(open(os.path.splitext(data["sel"])[0] + ".json"))["threshold"]
    check_page(data, data["sel"], open(out).read(), min(24, 14), threshold)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_gallery_ids_zero_leaves_out_the_identities(data, tmp_path):
    out = str(tmp_path / "p.html")
    main(["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", data["proxy"],
          "--gallery-ids", "0", "--out", out])
    sections, hist = parse(open(out).read())
    assert sections == {} and int(hist["faces"]) > 0


class _Recording:
    """A feature array that records the rows read from it."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, rows):
        self.reads.append(np.asarray(rows))
        return self.array[rows]


def test_large_dataset_histogram_takes_a_bounded_sample_read_in_row_order(data):
    keys, labels, _, kept = truth(data, data["sel"])
    sizes = np.bincount(labels)
    with_dropped = np.flatnonzero(np.bincount(labels[~kept], minlength=len(sizes)))
    ids, n = histogram_identities(labels, kept, max_rows=40, seed=3)
    assert n == len(with_dropped) and 0 < len(ids) < n and sizes[ids].sum() <= 40
    assert set(ids) <= set(with_dropped)
    feats = _Recording(np.load(os.path.join(data["feats"], "features.npy")))
    from plugins.face_nms.recordio_index import image_records
    _, rkeys, roffsets = image_records(data["rec"])
    page = build_page(data["rec"], feats, labels, rkeys, roffsets, kept, threshold=0.5, ids=0, seed=3, max_rows=40)
    read = np.concatenate(feats.reads)
    assert len(read) <= 40 and np.all(np.diff(read) > 0)
    _, hist = parse(page)
    assert int(hist["identities"]) == len(ids) and int(hist["identities-with-dropped"]) == n
    assert f"a random sample of {len(ids)} of the {n} identities" in page


# ---- bad inputs: one line, exit 1 (files) or 2 (command line) ----

def gallery(data, out, index=None, *extra):
    return ["gallery", "--rec", data["rec"], "--features", data["feats"], "--index", index or data["proxy"],
            "--out", out, *extra]


def test_gallery_bad_inputs(data, capsys, tmp_path):
    other = tmp_path / "other"
    images, labels, _ = synthetic_faces(n_ids=5, seed=9)
    write_recordio(str(other), images, labels, "insightface")
    foreign = str(tmp_path / "foreign.idx")
    main(["proxy-subset", "--rec", str(other), "--ratio", "0.5", "--out", foreign])
    out = str(tmp_path / "g.html")
    one_line(*cli(gallery(data, out, foreign), capsys), 1, foreign, "does not belong", "select again")
    one_line(*cli(gallery(data, out, str(tmp_path / "none.idx")), capsys), 1, "--index", "none.idx", "not found")
    one_line(*cli(gallery(data, out, str(tmp_path)), capsys), 1, "--index", "folder")
    one_line(*cli(["gallery", "--rec", data["rec"], "--features", str(tmp_path / "nofeats"), "--index",
                   data["proxy"], "--out", out], capsys), 1, "nofeats")
    one_line(*cli(["gallery", "--rec", str(other), "--features", data["feats"], "--index", foreign, "--out", out],
                  capsys), 1, "not extracted from", str(other))
    one_line(*cli(gallery(data, str(tmp_path / "missing" / "g.html")), capsys), 1, "missing", "create it")
    one_line(*cli(gallery(data, str(tmp_path)), capsys), 1, str(tmp_path), "folder")
    for value in ("-1", "x"):
        one_line(*cli(gallery(data, out, None, "--gallery-ids", value), capsys), 2, "--gallery-ids", value)
        one_line(*cli(["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6",
                       "--gallery-ids", value, "--out", str(tmp_path / "s.idx")], capsys), 2, "--gallery-ids")
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "s.idx")


def test_gallery_out_naming_an_input_is_refused(data, capsys, tmp_path):
    before = {p: open(p, "rb").read() for p in (data["proxy"], data["sel"], os.path.splitext(data["sel"])[0] + ".json",
                                                os.path.join(data["rec"], "train.idx"))}
    for target in (data["proxy"], os.path.join(data["rec"], "train.idx"), os.path.join(data["feats"], "meta.json")):
        one_line(*cli(gallery(data, target), capsys), 2, "--out", os.path.basename(target), "choose another --out")
    summary = os.path.splitext(data["sel"])[0] + ".json"
    one_line(*cli(gallery(data, summary, data["sel"]), capsys), 2, "summary of --index", "choose another --out")
    link = str(tmp_path / "g.html")
    os.symlink(data["proxy"], link)
    one_line(*cli(gallery(data, link), capsys), 2, link, "proxy.idx")
    assert {p: open(p, "rb").read() for p in before} == before


def test_select_page_naming_an_input_is_refused(data, capsys, tmp_path):
    """The page beside select's --out is one of its outputs: the guards cover it."""
    idx = os.path.join(data["rec"], "train.idx")
    before = open(idx, "rb").read()
    os.symlink(idx, tmp_path / "s.html")
    argv = ["select", "--features", data["feats"], "--rec", data["rec"], "--ratio", "0.6", "--out",
            str(tmp_path / "s.idx")]
    one_line(*cli(argv, capsys), 2, "s.html", "train.idx", "choose another --out")
    os.remove(tmp_path / "s.html")
    (tmp_path / "s.html").mkdir()
    one_line(*cli(argv, capsys), 1, "s.html", "folder")
    assert open(idx, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["s.html"]


# ---- the page written with its set ----

def test_page_is_replaced_with_the_rest_of_the_set(tmp_path):
    from plugins.face_nms.files import finish_interrupted_set, remove_stale_temporaries
    from plugins.face_nms.report import write_selection
    from plugins.face_nms.select import Selection
    names = ["sel.idx", "sel.json", "sel_retention.png", "sel_nn_cosine.png", "sel.html"]
    for kill_at in (1, 2, 3, 5, 7):  # the journal, the five renames, none
        for name in os.listdir(tmp_path):
            os.remove(tmp_path / name)
        sel = Selection(keep=np.arange(30), threshold=0.5, total=50, nn_cos=np.full(30, 0.3, np.float32))
        write_selection(str(tmp_path / "sel.idx"), np.arange(30), np.arange(30) * 100, sel,
                        np.repeat(np.arange(10), 5), page=lambda p, info, plots: open(p, "w").write("0.5"))
        rc = _write_in_child(tmp_path, kill_at, 0.25, page=True)
        finish_interrupted_set(str(tmp_path / "sel.idx"))
        for name in names:
            remove_stale_temporaries(str(tmp_path / name))
        assert sorted(os.listdir(tmp_path)) == sorted(names), (kill_at, os.listdir(tmp_path))
        state = (len(open(tmp_path / "sel.idx").read().splitlines()),
                 json.load(open(tmp_path / "sel.json"))["threshold"], open(tmp_path / "sel.html").read())
        assert state in ((20, 0.25, "0.25"), (30, 0.5, "0.5")), (kill_at, state)
        if rc == 0:
            assert state == (20, 0.25, "0.25")


def test_failed_page_keeps_the_old_set(data, tmp_path):
    from plugins.face_nms.report import write_selection
    from plugins.face_nms.select import Selection
    sel = Selection(keep=np.arange(30), threshold=0.5, total=50, nn_cos=np.full(30, 0.3, np.float32))
    write_selection(str(tmp_path / "sel.idx"), np.arange(30), np.arange(30) * 100, sel,
                    np.repeat(np.arange(10), 5), page=lambda p, info, plots: open(p, "w").write("old"))
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}

    def broken(path, info, plots):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_selection(str(tmp_path / "sel.idx"), np.arange(20), np.arange(20) * 100, sel,
                        np.repeat(np.arange(10), 5), page=broken)
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == before


def test_a_page_that_cannot_be_built_costs_no_selection(data, tmp_path, capsys):
    import shutil
    # the dataset's train.rec is cut short after select read the features: thumbnails cannot be decoded
    rec = tmp_path / "ds"
    shutil.copytree(data["rec"], rec)
    size = os.path.getsize(rec / "train.rec")
    with open(rec / "train.rec", "r+b") as f:
        f.truncate(size // 2)
    from plugins.face_nms.features import load_features
    from plugins.face_nms.gallery import selection_writer
    from plugins.face_nms.recordio_index import image_records
    from plugins.face_nms.report import write_selection
    from plugins.face_nms.select import select_core_set
    feats, labels, _, _ = load_features(data["feats"], data["rec"])
    sel = select_core_set(feats, labels, ratio=0.6, device="cpu")
    _, keys, offsets = image_records(data["rec"])
    said = []
    page = selection_writer(str(rec), feats, labels, keys, offsets, sel, str(tmp_path / "s.idx"), log=said.append)
    write_selection(str(tmp_path / "s.idx"), keys[sel.keep], offsets[sel.keep], sel, labels, page=page)
    assert len(read_idx(str(tmp_path / "s.idx"))[0]) == sel.kept
    text = open(tmp_path / "s.html").read()
    assert "id='no-faces'" in text and "<img" not in text and str(sel.kept) in text
    assert len(said) == 1 and "shows no faces" in said[0] and "python -m plugins.face_nms gallery" in said[0]


# ---- the page in a real browser ----

_REPORT = """<script>
window.addEventListener('load', function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i], r = im.getBoundingClientRect();
    out.push([im.complete && im.naturalWidth > 0 ? 1 : 0, im.naturalWidth, im.naturalHeight,
              r.left, r.top, im.className].join(' '));
  }
  var pre = document.createElement('pre');
  pre.id = 'img-report';
  pre.style.display = 'none';
  pre.textContent = out.join('\\n');
  document.body.appendChild(pre);
});
</script>"""
WINDOW = (1200, 2400)


def _browser(*args):
    return subprocess.run([shutil.which(BROWSER), "--headless", "--no-sandbox", "--hide-scrollbars",
                           "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def test_thumbnails_render_in_a_headless_browser(data, tmp_path):
    import cv2
    if shutil.which(BROWSER) is None:
        reason = f"no {BROWSER} on PATH: apt-get install -y {BROWSER} to run the browser test"
        print(reason)
        pytest.skip(reason)
    page = open(os.path.splitext(data["sel"])[0] + ".html").read()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _REPORT + "</body>"))
    dom = _browser("--dump-dom", f"file://{probe}").stdout
    report = re.search(r"<pre id=\"img-report\"[^>]*>(.*?)</pre>", dom, re.S)
    assert report, dom[-500:]
    rows = [line.split(" ") for line in report.group(1).strip().splitlines()]
    srcs = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(rows) == len(srcs) > 3
    assert all(r[0] == "1" for r in rows), [r for r in rows if r[0] != "1"][:3]
    thumbs = [(r, s) for r, s in zip(rows, srcs) if "thumb" in r[5:]]
    assert thumbs and all((int(r[1]), int(r[2])) == (THUMB, THUMB) for r, _ in thumbs)
    # the screenshot shows the decoded thumbnails where the DOM puts them
    shot = tmp_path / "shot.png"
    (tmp_path / "page.html").write_text(page)
    _browser(f"--screenshot={shot}", f"file://{tmp_path / 'page.html'}")
    screen = cv2.imread(str(shot))
    assert screen is not None and screen.shape[:2] == (WINDOW[1], WINDOW[0])
    compared = 0
    for r, src in thumbs:
        x, y = round(float(r[3])), round(float(r[4]))
        if y + THUMB > WINDOW[1]:
            continue
        want = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        diffs = [np.abs(screen[y + dy:y + dy + THUMB, x + dx:x + dx + THUMB].astype(int) - want).mean()
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert min(diffs) < 6, (r, min(diffs))
        compared += 1
    assert compared >= 5
    # and the page is not blank: most of the thumbnails' area is far from the white background
    assert (screen.min(axis=2) < 200).mean() > 0.05


def test_the_suppressor_is_the_kept_face_ranked_before_not_merely_the_nearest():
    from plugins.face_nms.nms import Ranker
    from plugins.face_nms.select import select_core_set
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, 32))
    labels = np.repeat(np.arange(40), 20)
    X = centers[labels] + 0.9 * rng.standard_normal((800, 32))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    sel = select_core_set(X, labels, ratio=0.5, device="cpu")
    kept = np.zeros(len(X), bool)
    kept[sel.keep] = True
    sup = find_suppressors(X, labels, kept, np.arange(40), ranker=Ranker("hard-first", device="cpu"))
    near = find_suppressors(X, labels, kept, np.arange(40))
    X64 = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    pos = ranks(X64, labels)
    for d, s, c in zip(sup.rows, sup.suppressor, sup.cosine):
        before = np.flatnonzero((labels == labels[d]) & kept & (pos < pos[d]))
        assert s in before and abs(c - (X64[before] @ X64[d]).max()) < 1e-5
    # greedy NMS dropped each face for a kept face ranked before it, closer than T
    assert np.all(sup.cosine > sel.threshold)
    # the nearest kept face is sometimes ranked after the dropped face: it did not suppress it
    assert (near.suppressor != sup.suppressor).any() and np.all(near.cosine >= sup.cosine)
