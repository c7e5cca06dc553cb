"""The conflicts and overlap pages, and the selection page's labels and numbers: their content
against the CSV/JSON outputs and the decoded records, and each page in a real browser."""
import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_cli import cli
from test_overlap import overlap, world  # noqa: F401  (the overlap fixture: train.rec, features, .bin files)

from plugins.face_nms.__main__ import main
from plugins.face_nms.demo import TinyNet, synthetic_faces, write_recordio
from plugins.face_nms.eval_bin import decode, read_bin
from plugins.face_nms.decode import RecordImages
from plugins.face_nms.extract import extract_features
from plugins.face_nms.models import TorchModel
from plugins.face_nms.conflicts_page import FLAGGED_SIDE
from plugins.face_nms.page_parts import FACES_PER_IDENTITY, THUMB
from plugins.face_nms.recordio_index import image_records, read_index

BROWSER = "chromium-headless-shell"


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """An im2rec set written by mxnet, identity 3 split under label 40, its features, conflicts and a selection."""
    root = tmp_path_factory.mktemp("pages")
    images, labels, _ = synthetic_faces(n_ids=40, seed=0)
    labels[np.flatnonzero(labels == 3)[::2]] = 40
    rec = str(root / "ds")
    write_recordio(rec, images, labels, "im2rec", shuffle_seed=0)
    feats = extract_features(rec, str(root / "feats"), TorchModel(TinyNet(seed=0), "cpu"), batch_size=64,
                             workers=0, progress=False)
    out = str(root / "c.json")
    main(["conflicts", "--features", feats, "--rec", rec, "--out", out, "--device", "cpu", "--drop",
          str(root / "noconflicts.idx")])
    sel = str(root / "sel.idx")
    main(["select", "--features", feats, "--rec", rec, "--ratio", "0.6", "--device", "cpu", "--gallery-ids", "6",
          "--out", sel])
    return {"root": root, "rec": rec, "feats": feats, "out": out, "page": str(root / "c.html"), "sel": sel}


def records(rec):
    """{key: (label, RGB image)} of every image record, decoded as extract decodes them."""
    full = read_index(rec)
    images = RecordImages(os.path.join(rec, "train.rec"), full.offsets, full.keys)
    return {int(k): (int(y), images[i].numpy()) for i, (k, y) in enumerate(zip(full.keys, full.labels))}


def thumb_pixels(src):
    import cv2
    return cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def expected_thumb(rgb):
    import cv2
    return cv2.resize(rgb, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def assert_same_image(src, rgb, what):
    got = thumb_pixels(src).astype(int)
    assert got.shape == (THUMB, THUMB, 3), what
    diff = np.abs(got - expected_thumb(rgb).astype(int)).mean()
    # JPEG at quality 80 of the same (noisy synthetic) pixels; two faces of the set differ by 73 (median)
    assert diff < 12, (what, diff)


def attrs(tag):
    return {k: html.unescape(v) for k, v in re.findall(r"data-([\w-]+)='([^']*)'", tag)}


def table_rows(page, table_id):
    """[(row attributes, [(img attributes, src)] per cell)] of a table.rows."""
    body = re.search(rf"<table class='rows' id='{table_id}'>.*?<tbody>(.*?)</tbody>", page, re.S).group(1)
    out = []
    for tr, inner in re.findall(r"<tr ([^>]*)>(.*?)</tr>", body, re.S):
        cells = [[(attrs(t), s) for t, s in re.findall(r"<img ([^>]*?)src='([^']*)'", td)]
                 for td in re.findall(r"<td[^>]*>(.*?)</td>", inner, re.S)]
        out.append((attrs(tr), cells))
    return out


def key_of(img_attrs):
    return int(img_attrs["ref"].split()[1])


# ---- the conflicts page ----

def test_conflicts_page_shows_the_csv_pairs_and_faces_with_their_records(ds):
    page = open(ds["page"]).read()
    recs = records(ds["rec"])
    pairs = list(csv.DictReader(open(ds["out"][:-5] + "_pairs.csv")))
    faces = list(csv.DictReader(open(ds["out"][:-5] + "_faces.csv")))
    assert pairs and faces and (int(pairs[0]["label_a"]), int(pairs[0]["label_b"])) == (3, 40)
    rows = table_rows(page, "pairs")
    assert [(int(a["label-a"]), int(a["label-b"]), int(a["size-a"]), int(a["size-b"]), float(a["cosine"]))
            for a, _ in rows] == [(int(p["label_a"]), int(p["label_b"]), int(p["size_a"]), int(p["size_b"]),
                                   float(p["cosine"])) for p in pairs]
    sizes = {}
    for key, (label, _) in recs.items():
        sizes[label] = sizes.get(label, 0) + 1
    for a, cells in rows:
        for label, cell in ((int(a["label-a"]), cells[2]), (int(a["label-b"]), cells[3])):
            assert len(cell) == min(FACES_PER_IDENTITY, sizes[label])
            assert len({key_of(t) for t, _ in cell}) == len(cell)
            for t, src in cell:
                assert recs[key_of(t)][0] == label
                assert_same_image(src, recs[key_of(t)][1], t)
    # the flagged faces, most similar first, each beside faces of its own identity and of the other one
    frows = table_rows(page, "faces")
    want = sorted(faces, key=lambda f: (-float(f["cosine_other"]), int(f["key"])))
    assert [(int(a["key"]), int(a["label"]), int(a["other-label"]), float(a["cosine-own"]), float(a["cosine"]))
            for a, _ in frows] == [(int(f["key"]), int(f["label"]), int(f["other_label"]), float(f["cosine_own"]),
                                    float(f["cosine_other"])) for f in want]
    for a, cells in frows:
        (flag, src), = cells[2]
        assert key_of(flag) == int(a["key"]) and recs[int(a["key"])][0] == int(a["label"])
        assert_same_image(src, recs[int(a["key"])][1], flag)
        own, other = cells[3], cells[4]
        assert own and other and int(a["key"]) not in {key_of(t) for t, _ in own}
        assert len(own) <= FLAGGED_SIDE and len(other) == min(FLAGGED_SIDE, sizes[int(a["other-label"])])
        assert all(recs[key_of(t)][0] == int(a["label"]) for t, _ in own)
        assert all(recs[key_of(t)][0] == int(a["other-label"]) for t, _ in other)
        for t, s in own + other:
            assert_same_image(s, recs[key_of(t)][1], t)
    info = json.load(open(ds["out"]))
    assert f"T = {info['threshold']:.4f}" in page and float(re.search(r"data-threshold='([^']*)'", page).group(1)) \
        == info["threshold"]
    # nothing is fetched: images are data: URIs, the script is inline
    assert set(re.findall(r"<img [^>]*src='([^:']*):", page)) == {"data"}
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page) and "<link" not in page


def test_conflicts_page_rows_are_capped_and_the_rest_counted(ds, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli(["conflicts", "--features", ds["feats"], "--rec", ds["rec"], "--out", str(out), "--device", "cpu",
                "--threshold", "0.9", "--page-rows", "3"], capsys)[0] == 0
    info = json.load(open(out))
    page = open(tmp_path / "c.html").read()
    rows = table_rows(page, "pairs")
    pairs = list(csv.DictReader(open(tmp_path / "c_pairs.csv")))
    assert info["pairs"] > 3 and len(rows) == 3
    assert [(int(a["label-a"]), int(a["label-b"])) for a, _ in rows] == [(int(p["label_a"]), int(p["label_b"]))
                                                                         for p in pairs[:3]]
    assert f"{info['pairs'] - 3:,} more pairs" in page and f"(3 of {info['pairs']:,})" in page
    assert len(table_rows(page, "faces")) == min(3, info["flagged_faces"])
    assert sorted(os.listdir(tmp_path)) == ["c.html", "c.json", "c_faces.csv", "c_pairs.csv"]


def test_conflicts_page_is_part_of_the_output_set(ds, tmp_path, capsys):
    """A page that names an input is refused like the other outputs; nothing is written."""
    idx = os.path.join(ds["rec"], "train.idx")
    before = open(idx, "rb").read()
    os.symlink(idx, tmp_path / "c.html")
    status, err = cli(["conflicts", "--features", ds["feats"], "--rec", ds["rec"], "--out", str(tmp_path / "c.json"),
                       "--device", "cpu"], capsys)
    assert status == 2 and len(err) == 1 and "c.html" in err[0] and "replace an input" in err[0], err
    assert open(idx, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["c.html"]


def test_a_conflicts_page_without_decodable_records_keeps_its_tables(ds, tmp_path):
    from plugins.face_nms.conflicts_page import conflicts_page
    from plugins.face_nms.features import load_features
    rec = tmp_path / "ds"
    shutil.copytree(ds["rec"], rec)
    with open(rec / "train.rec", "r+b") as f:
        f.truncate(os.path.getsize(rec / "train.rec") // 2)
    _, labels, keys, _ = load_features(ds["feats"], ds["rec"])
    info = json.load(open(ds["out"]))
    pairs = [{k: (float(v) if k == "cosine" else int(v)) for k, v in p.items()}
             for p in csv.DictReader(open(ds["out"][:-5] + "_pairs.csv"))]
    said = []
    page = conflicts_page("t", info, pairs, [], np.zeros(0, np.int64), labels, keys, str(rec), log=said.append)
    assert "id='no-faces'" in page and "train.rec" in page and "<img" not in page
    assert [(int(a["label-a"]), int(a["label-b"])) for a, _ in table_rows(page, "pairs")] == \
        [(p["label_a"], p["label_b"]) for p in pairs]
    assert len(said) == 1 and "shows no faces" in said[0]


def test_page_rows_must_be_a_count(ds, world, tmp_path, capsys):  # noqa: F811
    from test_cli import one_line
    for value in ("-1", "x"):
        one_line(*cli(["conflicts", "--features", ds["feats"], "--rec", ds["rec"], "--out", str(tmp_path / "c.json"),
                       "--page-rows", value], capsys), 2, "--page-rows", value)
        one_line(*cli(overlap(world, "--out", str(tmp_path / "o.json"), "--page-rows", value), capsys), 2,
                 "--page-rows", value)
    assert os.listdir(tmp_path) == []


# ---- the overlap page ----

def test_overlap_page_shows_the_report_matches_with_their_images(world, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "overlap.json")
    assert cli(overlap(world, "--out", out), capsys)[0] == 0
    report = json.load(open(out))
    page = open(tmp_path / "overlap.html").read()
    recs = records(world.rec)
    threshold = float(re.search(r"id='threshold' data-threshold='([^']*)'", page).group(1))
    assert threshold == report["threshold"] and f"t = {report['threshold']:.4f}" in page
    assert "robust equal-error point" in page
    bodies = re.findall(r"<table class='rows' data-bin='([^']*)'>.*?<tbody>(.*?)</tbody>", page, re.S)
    assert [b for b, _ in bodies] == [e["bin"] for e in report["bins"]]
    shown = 0
    for (path, body), entry in zip(bodies, report["bins"]):
        b = read_bin(path)
        rows = re.findall(r"<tr ([^>]*)>(.*?)</tr>", body, re.S)
        want = sorted(entry["identities"], key=lambda x: (-x["cosine"], x["label"]))
        assert [(int(attrs(a)["label"]), float(attrs(a)["cosine"]), [int(i) for i in attrs(a)["images"].split()])
                for a, _ in rows] == [(x["label"], x["cosine"], x["image_indices"]) for x in want]
        for a, inner in rows:
            label = int(attrs(a)["label"])
            imgs = [(attrs(t), s) for t, s in re.findall(r"<img ([^>]*?)src='([^']*)'", inner)]
            train = [(t, s) for t, s in imgs if t["ref"].startswith("key ")]
            evals = [(t, s) for t, s in imgs if t["ref"].startswith("image ")]
            assert train and all(recs[key_of(t)][0] == label for t, _ in train)
            for t, s in train:
                assert_same_image(s, recs[key_of(t)][1], t)
            assert [key_of(t) for t, _ in evals] == [int(i) for i in attrs(a)["images"].split()][:FACES_PER_IDENTITY]
            for t, s in evals:
                assert_same_image(s, decode(b, key_of(t)), t)
            shown += 1
    assert shown == sum(len(e["identities"]) for e in report["bins"]) > 0


# ---- the selection page: labels under the pairs, the numbers in words, the plots ----

def test_selection_page_labels_each_pair_and_writes_numbers_in_words(ds):
    page = open(os.path.splitext(ds["sel"])[0] + ".html").read()
    info = json.load(open(os.path.splitext(ds["sel"])[0] + ".json"))
    pairs = re.findall(r"<figure class='pair' ([^>]*)>(.*?)</figure>", page, re.S)
    assert pairs
    for a, inner in pairs:
        a = attrs(a)
        cells = re.findall(r"<span class='cell'>(.*?)</span></span>", inner, re.S)
        assert len(cells) == 2, inner
        assert "data-ref='key {}'".format(a["key"]) in cells[0] and ">dropped<" in cells[0] and \
            f"key {a['key']}" in cells[0]
        assert "data-ref='key {}'".format(a["suppressor-key"]) in cells[1] and ">kept<" in cells[1] and \
            f"key {a['suppressor-key']}" in cells[1]
    numbers = re.search(r"<table class='numbers'>(.*?)</table>\s*<div class='plots'>", page, re.S).group(1)
    # the histogram as a table of its values
    hist = re.search(r"<table class='histogram'>(.*?)</table>", numbers, re.S).group(1)
    head, body = re.findall(r"<tr>(.*?)</tr>", hist, re.S)
    got = dict(zip(re.findall(r"<td>([\d,]+)</td>", head), re.findall(r"<td>([\d,]+)</td>", body)))
    assert {int(k.replace(",", "")): int(v.replace(",", "")) for k, v in got.items()} == \
        {int(k): v for k, v in info["kept_per_identity_histogram"].items()}
    # the threshold search as a labelled table, one row per threshold tried
    search = re.search(r"<table class='search'><tr><th>threshold</th><th>kept fraction</th></tr>(.*?)</table>",
                       numbers, re.S).group(1)
    cells = re.findall(r"<tr><td>([\d.]+)</td><td>([\d.]+)%</td></tr>", search)
    assert [(float(t), float(f)) for t, f in cells] == [(round(t, 5), round(100 * f, 2))
                                                         for t, f in sorted(info["threshold_search"])]
    # in words, rounded: no field names, no 16-digit figures, digests shortened
    visible = re.sub(r"<[^>]+>", " ", numbers)
    assert "kept_per_identity_histogram" not in visible and "threshold_search" not in visible
    assert "identities by faces kept" in visible and "threshold search" in visible
    assert not re.search(r"\d\.\d{7,}", visible)
    sha = info["dataset"]["train_idx_sha256"]
    assert sha not in page and sha[:12] in numbers
    size = info["dataset"]["train_rec_bytes"]
    assert f"{size / 1e6:.1f} MB ({size:,} bytes)" in visible
    assert f"fraction kept</th><td>{info['kept_fraction']:.1%}" in numbers
    assert f"faces kept</th><td>{info['kept']:,}" in numbers


def test_plots_show_every_axis_label_and_plain_ticks(ds):
    import cv2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plugins.face_nms.report import _retention_by_size, retention_axes
    stem = os.path.splitext(ds["sel"])[0]
    for name in ("_nn_cosine.png", "_retention.png"):
        png = cv2.imread(stem + name)
        # nothing touches the image's edges: a label wider than the figure would be cut there
        edges = [png[:, :3], png[:, -3:], png[:3], png[-3:]]
        assert min(int(x.min()) for x in edges) > 240, name
        # and the bottom rows hold the x label (dark text under the tick labels)
        assert (png[-30:].min(axis=2) < 128).any(), name
    # retention ticks are plain numbers over identity sizes from 1 to 800
    labels = np.repeat(np.arange(6), [1, 2, 5, 30, 200, 800])
    xs, ys = _retention_by_size(labels, np.arange(0, len(labels), 2))
    fig, ax = plt.subplots()
    retention_axes(ax, xs, ys, 0.5)
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and
             ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    minor = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)
    assert ticks and all(re.fullmatch(r"[\d,]+", t) for t in ticks), ticks
    assert minor == [] and {"1", "10", "100"} <= set(ticks)


# ---- each page in a real browser ----

_REPORT = """<script>
window.addEventListener('load', function () {
  setTimeout(function () {
    var out = [];
    for (var i = 0; i < document.images.length; i++) {
      var im = document.images[i], r = im.getBoundingClientRect();
      out.push([im.complete && im.naturalWidth > 0 ? 1 : 0, im.naturalWidth, im.naturalHeight,
                Math.round(r.left + window.scrollX), Math.round(r.top + window.scrollY),
                (im.dataset.ref || '-').replace(' ', '_'), im.className.replace(/ /g, '.')].join(' '));
    }
    var pre = document.createElement('pre');
    pre.id = 'img-report';
    pre.style.display = 'none';
    pre.textContent = out.join('\\n');
    var txt = document.createElement('pre');
    txt.id = 'text-report';
    txt.style.display = 'none';
    txt.textContent = document.body.innerText;
    var hidden = document.createElement('pre');
    hidden.id = 'hidden-report';
    hidden.style.display = 'none';
    hidden.textContent = document.querySelectorAll('tr.hidden').length + ' ' +
      document.querySelectorAll('table.rows > tbody > tr').length;
    document.body.appendChild(pre); document.body.appendChild(txt); document.body.appendChild(hidden);
  }, 0);
});
</script>"""
WINDOW = (1200, 1600)


def _browser(*args):
    return subprocess.run([shutil.which(BROWSER), "--headless", "--no-sandbox", "--hide-scrollbars",
                           "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def in_browser(page, tmp_path, fragment=""):
    """(images: [(loaded, w, h, x, y, ref, class)], the page's text, (hidden rows, rows), screenshot)."""
    import cv2
    if shutil.which(BROWSER) is None:
        reason = f"no {BROWSER} on PATH: apt-get install -y {BROWSER} to run the browser tests"
        print(reason)
        pytest.skip(reason)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _REPORT + "</body>"))
    dom = _browser("--dump-dom", f"file://{probe}{fragment}").stdout
    report = re.search(r"<pre id=\"img-report\"[^>]*>(.*?)</pre>", dom, re.S)
    assert report, dom[-500:]
    images = [line.split(" ") for line in html.unescape(report.group(1)).strip().splitlines()]
    text = html.unescape(re.search(r"<pre id=\"text-report\"[^>]*>(.*?)</pre>", dom, re.S).group(1))
    hidden = tuple(int(x) for x in re.search(r"<pre id=\"hidden-report\"[^>]*>(.*?)</pre>", dom, re.S).group(1)
                   .split())
    shot = tmp_path / "shot.png"
    (tmp_path / "page.html").write_text(page)
    _browser(f"--screenshot={shot}", f"file://{tmp_path / 'page.html'}{fragment}")
    return images, text, hidden, cv2.imread(str(shot))[:, :, ::-1]


def assert_screen_shows(screen, images, expected, least=4):
    """Each thumbnail inside the window shows its decoded record where the DOM puts it."""
    compared = 0
    for loaded, w, h, x, y, ref, cls in images:
        x, y = int(x), int(y)
        if ref not in expected or y + THUMB > screen.shape[0] or x + THUMB > screen.shape[1]:
            continue
        want = expected_thumb(expected[ref]).astype(int)
        diffs = [np.abs(screen[y + dy:y + dy + THUMB, x + dx:x + dx + THUMB].astype(int) - want).mean()
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert min(diffs) < 14, (ref, min(diffs))
        compared += 1
    assert compared >= least, compared


def test_conflicts_page_in_a_browser(ds, tmp_path):
    page = open(ds["page"]).read()
    images, text, hidden, screen = in_browser(page, tmp_path)
    assert images and all(i[0] == "1" and (int(i[1]), int(i[2])) == (THUMB, THUMB) for i in images), images[:3]
    pair = next(csv.DictReader(open(ds["out"][:-5] + "_pairs.csv")))
    assert f"identity {pair['label_a']}" in text and f"identity {pair['label_b']}" in text
    assert f"{float(pair['cosine']):.4f}" in text and "smaller: --drop removes it" in text
    assert hidden == (0, len(table_rows(page, "pairs")) + len(table_rows(page, "faces")))
    recs = {f"key_{k}": im for k, (_, im) in records(ds["rec"]).items()}
    assert_screen_shows(screen, images, recs)
    # the filter: rows below the cosine in the address are hidden, the top pair stays
    top = float(pair["cosine"])
    faces = [float(f["cosine_other"]) for f in csv.DictReader(open(ds["out"][:-5] + "_faces.csv"))]
    _, text, hidden, _ = in_browser(page, tmp_path, f"#min={top}")
    below = sum(c < top for c in faces)
    assert hidden == (below, 1 + len(faces)) and f"{1 + len(faces) - below} of {1 + len(faces)} rows shown" in text


def test_overlap_page_in_a_browser(world, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "overlap.json")
    assert cli(overlap(world, "--out", out), capsys)[0] == 0
    report = json.load(open(out))
    page = open(tmp_path / "overlap.html").read()
    images, text, hidden, screen = in_browser(page, tmp_path / "..")
    assert images and all(i[0] == "1" and (int(i[1]), int(i[2])) == (THUMB, THUMB) for i in images)
    top = max(report["bins"][0]["identities"], key=lambda x: x["cosine"])
    assert f"identity {top['label']}" in text and f"t = {report['threshold']:.4f}" in text
    recs = {f"key_{k}": im for k, (_, im) in records(world.rec).items()}
    first = read_bin(report["bins"][0]["bin"])
    recs.update({f"image_{i}": decode(first, i) for i in range(len(first))})
    assert_screen_shows(screen, images, recs)
    assert hidden[0] == 0 and hidden[1] == sum(len(e["identities"]) for e in report["bins"])


def test_selection_page_labels_in_a_browser(ds, tmp_path):
    page = open(os.path.splitext(ds["sel"])[0] + ".html").read()
    images, text, _, screen = in_browser(page, tmp_path)
    assert all(i[0] == "1" for i in images)
    a = attrs(re.search(r"<figure class='pair' ([^>]*)>", page).group(1))
    assert f"key {a['key']}" in text and f"key {a['suppressor-key']}" in text
    assert "dropped" in text and "identities by faces kept" in text and "threshold search" in text
    assert "kept_per_identity_histogram" not in text
    recs = {f"key_{k}": im for k, (_, im) in records(ds["rec"]).items()}
    assert_screen_shows(screen, images, recs)


def test_warnings_stand_at_the_top_of_the_cleaning_pages():
    from plugins.face_nms.page_parts import warnings_html
    html = warnings_html(["the default threshold reaches 1.0000 <b>"])
    assert html.startswith("<div id='warnings'") and "reaches 1.0000 &lt;b&gt;" in html
    assert warnings_html([]) == "" and warnings_html(None) == ""
