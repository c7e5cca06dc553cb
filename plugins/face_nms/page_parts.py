"""Pieces shared by the HTML pages (selection gallery, conflicts, overlap).

Thumbnails are decoded from ``train.rec`` as extract decodes them (:class:`.extract.RecordImages`)
or from an evaluation ``.bin`` as the host loads it (:func:`.eval_bin.decode`), downscaled to
``THUMB`` px JPEG and embedded as data: URIs. The pages fetch nothing: their one script (sorting
and filtering rows by cosine) is inline.
"""
import base64
import html

import numpy as np

THUMB = 64
JPEG_QUALITY = 80
FACES_PER_IDENTITY = 6  # faces of one identity shown beside a pair or a match

STYLE = """
body{font:14px/1.4 sans-serif;margin:16px;color:#222;background:#fff}
table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;vertical-align:top;text-align:left}
h1{font-size:20px}h2{font-size:17px;margin:18px 0 6px}
.legend,.rule{color:#444;max-width:1100px}
.warnings{background:#fff4e0;border:1px solid #e0a040;padding:4px 10px;max-width:1100px}
.controls{background:#f4f4f4;padding:6px 8px;margin:8px 0;display:inline-block}
.controls input{width:6em}
table.rows>tbody>tr{border-top:1px solid #ccc}
table.rows td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.faces{display:flex;flex-wrap:wrap;align-items:flex-end;gap:4px;margin:2px 0}
figure{margin:0;text-align:center;font-size:11px}
figure.flagged{border:2px solid #c44;padding:1px}
.who{font-weight:bold}.small{color:#666;font-size:12px}
img.thumb{width:%dpx;height:%dpx;display:inline-block}
.more{color:#777;font-size:12px;padding:0 6px}
tr.hidden{display:none}
""" % (THUMB, THUMB)

# Filters the rows of every table.rows by data-cosine (at least the value in #min-cosine) and sorts
# them by cosine; the address's #min=0.9&sort=asc sets both, so a filtered view can be shared.
SCRIPT = """<script>
(function () {
  function apply() {
    var min = parseFloat(document.getElementById('min-cosine').value);
    var order = document.getElementById('sort').value;
    var shown = 0, total = 0;
    document.querySelectorAll('table.rows > tbody').forEach(function (body) {
      var rows = Array.prototype.slice.call(body.children);
      rows.sort(function (a, b) {
        var d = parseFloat(a.dataset.cosine) - parseFloat(b.dataset.cosine);
        return order === 'asc' ? d : -d;
      });
      rows.forEach(function (r) {
        var hide = !isNaN(min) && parseFloat(r.dataset.cosine) < min;
        r.classList.toggle('hidden', hide);
        body.appendChild(r);
        total += 1; shown += hide ? 0 : 1;
      });
    });
    document.getElementById('shown-count').textContent = shown + ' of ' + total + ' rows shown';
  }
  window.addEventListener('load', function () {
    var q = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var p = kv.split('='); if (p[0]) q[p[0]] = decodeURIComponent(p[1] || '');
    });
    if (q.min !== undefined) document.getElementById('min-cosine').value = q.min;
    if (q.sort === 'asc' || q.sort === 'desc') document.getElementById('sort').value = q.sort;
    document.getElementById('min-cosine').addEventListener('input', apply);
    document.getElementById('sort').addEventListener('change', apply);
    apply();
  });
})();
</script>"""

CONTROLS = ("<div class='controls'>show rows with cosine at least <input id='min-cosine' type='number' step='0.01' "
            "min='-1' max='1' placeholder='any'> sorted by cosine <select id='sort'><option value='desc'>"
            "highest first</option><option value='asc'>lowest first</option></select> <span id='shown-count'>"
            "</span></div>")


def e(text):
    """``text`` escaped for HTML; the undecodable bytes of a file name (kept as surrogates) shown as \\xNN."""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape" if _escaped_bytes_only(text) else "backslashreplace")
        text = text.decode("utf-8", "backslashreplace")
    return html.escape(text, quote=True)


def _escaped_bytes_only(text):
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def uri(data, kind):
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def thumbnail(rgb):
    """A data: URI of an RGB uint8 image, downscaled to THUMB px JPEG."""
    import cv2
    small = cv2.resize(rgb, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small[:, :, ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
    return uri(buf.tobytes(), "jpeg")


def record_thumbnails(dataset, rows):
    """{row: data URI} of the face records ``rows`` of ``dataset`` (a path or a :mod:`.datasets` object)."""
    from .datasets import open_dataset
    rows = np.unique(np.asarray(rows, np.int64))
    images = open_dataset(dataset).images(rows)
    return {int(r): thumbnail(images[i].numpy()) for i, r in enumerate(rows)}


def spread(rows, n=FACES_PER_IDENTITY):
    """Up to ``n`` of ``rows`` spread evenly over them (first and last included)."""
    rows = np.asarray(rows)
    if len(rows) <= n:
        return rows
    return rows[np.unique(np.linspace(0, len(rows) - 1, n).round().astype(np.int64))]


def rows_of(labels, wanted):
    """{label: its rows, ascending} for the labels ``wanted``, in one pass over ``labels``."""
    labels = np.asarray(labels)
    hit = np.flatnonzero(np.isin(labels, np.asarray(list(wanted), np.int64)))
    order = np.argsort(labels[hit], kind="stable")
    groups = np.split(hit[order], np.flatnonzero(np.diff(labels[hit][order])) + 1) if len(hit) else []
    return {int(labels[g[0]]): g for g in groups}


def img(src, role, ref, caption):
    """A thumbnail with its caption under it. ``role``: what the face is (kept, flagged, evaluation, ...);
    ``ref``: where it comes from ("key 17": a record of train.rec, "image 4": of a .bin)."""
    return (f"<figure class='face-thumb {role}'><img class='thumb {role}' data-ref='{e(ref)}' src='{src}' "
            f"width='{THUMB}' height='{THUMB}' alt='{e(role)} {e(ref)}' title='{e(role)} {e(ref)}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def more(n, what):
    return f"<span class='more'>+{n:,} more {e(what)}</span>" if n > 0 else ""


def head(title, script=False):
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style>"
            f"{SCRIPT if script else ''}</head><body><h1>{e(title)}</h1>")


def warnings_html(lines):
    """The warnings a command printed, as a list at the top of its page (nothing when there are none)."""
    if not lines:
        return ""
    return ("<div id='warnings' class='warnings'><b>Warnings</b> (also on stderr and in the JSON):<ul>" +
            "".join(f"<li>{e(w)}</li>" for w in lines) + "</ul></div>")

