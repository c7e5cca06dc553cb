"""The gallery: one self-contained HTML page showing what a selection keeps and drops.

The page holds the run's numbers (the ``.json`` summary), its plots, a histogram of each dropped
face's cosine to its suppressor (the nearest kept face of its identity, :mod:`.suppressors`) with
the threshold T drawn on it, and a sample of identities (the largest, the smallest of at least
two faces, the most reduced), each with its kept faces and every shown dropped face beside its
suppressor and their cosine. Thumbnails are decoded from ``train.rec`` as extract decodes them
(:class:`.decode.RecordImages`), downscaled to ``THUMB`` px JPEG and embedded as data: URIs:
no script, font or style sheet is fetched, the page opens from disk.

Size: at most ``PER_IDENTITY`` kept faces and ``PER_IDENTITY`` dropped pairs per identity are
shown (the rest as "+n more"), so ``ids`` identities cost at most 3 x ``PER_IDENTITY`` x ``ids``
thumbnails of about 2 KB (about 1.7 MB for the default 24), plus the plots.
"""
import io
import os

import numpy as np

from .files import output_set
from .numbers_table import numbers_table
from .page_parts import THUMB, e as _e, thumbnail as _thumbnail, uri as _uri
from .suppressors import HIST_ROWS, find_suppressors, histogram_identities

GALLERY_IDS = 24
PER_IDENTITY = 12

_STYLE = """
body{font:14px/1.4 sans-serif;margin:16px;color:#222;background:#fff}
table{border-collapse:collapse}td,th{padding:1px 10px 1px 0;vertical-align:top;text-align:left}
table.numbers>tbody>tr>th,table.numbers>tr>th{font-weight:normal;color:#555;max-width:280px}
table.histogram td,table.histogram th,table.search td,table.search th,table.records td,table.records th{
border:1px solid #ddd;padding:1px 6px;font-size:12px;font-weight:normal;text-align:right}
div.search{max-height:180px;overflow-y:auto;display:inline-block}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{max-width:520px}.plots img{border:1px solid #ddd}
.legend{color:#555}
section{border-top:1px solid #ccc;padding:6px 0}
h3{margin:4px 0;font-size:15px}.why{color:#777;font-weight:normal}
.faces{display:flex;flex-wrap:wrap;align-items:flex-end;gap:4px;margin:4px 0}
figure{margin:0;text-align:center;font-size:11px}
figure.pair{border:1px solid #e3b3b3;padding:2px;background:#fdf3f3}
figure.pair .cell{display:inline-block;vertical-align:top;margin:0 1px}
.role{display:block;font-weight:bold}.role.dropped{color:#a33}.role.suppressor{color:#363}
img.thumb{width:%dpx;height:%dpx;display:inline-block}
.more{color:#777;font-size:12px;padding:0 6px}
""" % (THUMB, THUMB)


def pick_identities(labels, kept, n):
    """Up to ``n`` distinct (label, why): the largest, the smallest (of >= 2 faces), the most reduced, in turn."""
    sizes = np.bincount(labels)
    n_kept = np.bincount(labels[kept], minlength=len(sizes))
    present = np.flatnonzero(sizes > 0)
    multi = present[sizes[present] > 1]
    small = multi if len(multi) else present
    lists = [("largest", present[np.lexsort((present, -sizes[present]))]),
             ("smallest", small[np.lexsort((small, sizes[small]))]),
             ("most reduced", present[np.lexsort((present, -sizes[present],
                                                  n_kept[present] / sizes[present]))])]
    chosen, seen, at = [], set(), [0, 0, 0]
    while len(chosen) < n and any(at[i] < len(lst) for i, (_, lst) in enumerate(lists)):
        for i, (why, lst) in enumerate(lists):
            while at[i] < len(lst) and int(lst[at[i]]) in seen:
                at[i] += 1
            if at[i] < len(lst) and len(chosen) < n:
                seen.add(int(lst[at[i]]))
                chosen.append((int(lst[at[i]]), why))
    return chosen


def build_page(rec_dir, features, labels, keys, offsets, kept, *, threshold=None, numbers=(), plots=(),
               ids=GALLERY_IDS, seed=0, max_rows=HIST_ROWS, title="Face-NMS selection", ranker=None):
    """The page's HTML.

    Args:
        rec_dir: the dataset, a path or a :mod:`.datasets` object (RecordIO or image folder).
        features, labels, keys, offsets: one row per face record of ``rec_dir`` (its order; ``offsets`` is
            not read, the dataset gives the images).
        kept: bool per row, the records the index keeps.
        threshold: T of an NMS selection, drawn on the histogram (None: no line).
        numbers: (name, value) pairs of the run; plots: (caption, PNG bytes) pairs.
        ids: identities shown (0: none); seed: of the histogram's identity sample, when one is needed.
        max_rows: rows read for the histogram, at most.
        ranker: the selection's :class:`.nms.Ranker`: suppressors among the kept faces ranked before
            the dropped one (None: the nearest kept face).
    """
    labels = np.asarray(labels, np.int64)
    source = getattr(features, "filename", None) or "features"
    hist_ids, with_dropped = histogram_identities(labels, kept, max_rows, seed)
    shown = pick_identities(labels, kept, ids)
    wanted = np.union1d(hist_ids, np.array([lab for lab, _ in shown], np.int64))
    sup = find_suppressors(features, labels, kept, wanted, source, ranker)
    who = ("the most similar kept face ranked before it" if ranker is not None
           else "the nearest kept face of its identity")
    in_hist = np.isin(labels[sup.rows], hist_ids)
    cos = sup.cosine[in_hist]
    cos = cos[np.isfinite(cos)]
    if len(hist_ids) == with_dropped:
        scope = f"all {len(cos):,} dropped faces with a kept face of their identity ({with_dropped:,} identities)"
    else:
        scope = (f"the {len(cos):,} dropped faces of a random sample of {len(hist_ids):,} of the {with_dropped:,} "
                 f"identities with dropped faces (at most {max_rows:,} faces read)")
    caption = f"cosine of each dropped face to its suppressor, {who}: {scope}"
    hist = _histogram_png(cos, threshold)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>",
             _numbers_table(numbers),
             "<div class='plots'>"]
    for cap, png in plots:
        parts.append(f"<figure><img src='{_uri(png, 'png')}' alt='{_e(cap)}'><figcaption>{_e(cap)}</figcaption>"
                     f"</figure>")
    t = "" if threshold is None else f" data-threshold='{threshold!r}'"
    parts.append(f"<figure id='suppressor-histogram' data-faces='{len(cos)}' data-identities='{len(hist_ids)}' "
                 f"data-identities-with-dropped='{with_dropped}'{t}><img src='{_uri(hist, 'png')}' "
                 f"alt='suppressor cosine histogram'><figcaption>{_e(caption)}</figcaption></figure></div>")
    if shown:
        parts.append(_identities(rec_dir, labels, keys, offsets, kept, shown, sup, who))
    parts.append("</body></html>")
    return "\n".join(parts)


def _identities(rec_dir, labels, keys, offsets, kept, shown, sup, who):
    from .datasets import open_dataset
    ds = open_dataset(rec_dir)
    blocks, need = [], []
    for label, why in shown:
        rows = np.flatnonzero(labels == label)
        k, d = rows[kept[rows]], rows[~kept[rows]]
        srows, scos = sup.of(d)
        by = np.lexsort((d, -np.nan_to_num(scos, nan=-2.0)))  # closest pairs first
        k_shown, d_shown = k[:PER_IDENTITY], by[:PER_IDENTITY]
        blocks.append((label, why, len(rows), k, d, k_shown, d[d_shown], srows[d_shown], scos[d_shown]))
        need += [k_shown, d[d_shown], srows[d_shown][srows[d_shown] >= 0]]
    need = np.unique(np.concatenate(need)) if need else np.zeros(0, np.int64)
    images = ds.images(need)
    thumbs = {int(r): _thumbnail(images[i].numpy()) for i, r in enumerate(need)}

    def img(row, role):
        name = ds.record_name(row)
        return (f"<img class='thumb {role}' data-ref='key {int(keys[row])}' src='{thumbs[int(row)]}' width='{THUMB}' "
                f"height='{THUMB}' "
                f"alt='key {int(keys[row])}' title='{role} face, record {_e(name)}'>")

    def cell(row, role):
        word = "dropped" if role == "dropped" else "kept"
        return (f"<span class='cell'>{img(row, role)}<span class='role {role}'>{word}</span>"
                f"<span class='key'>key {int(keys[row])}</span></span>")

    out = ["<h2>Identities</h2><p class='legend'>Per identity: its kept faces (record keys below), then each "
           f"dropped face (red frame, closest first): the dropped face on the left, its suppressor ({_e(who)}, "
           f"kept) on the right, their record keys under them and their cosine.</p>"]
    for label, why, n, k, d, k_shown, d_shown, s_shown, c_shown in blocks:
        out.append(f"<section class='identity' id='identity-{label}' data-label='{label}' data-faces='{n}' "
                   f"data-kept='{len(k)}' data-dropped='{len(d)}'><h3>identity {label} <span class='why'>"
                   f"{_e(why)}</span></h3><div>{n} faces: {len(k)} kept, {len(d)} dropped</div>")
        out.append("<div class='faces kept'>" + "".join(
            f"<figure class='face' data-key='{int(keys[r])}'>{img(r, 'kept')}<figcaption>{int(keys[r])}"
            f"</figcaption></figure>" for r in k_shown) + _more(len(k) - len(k_shown), "kept") + "</div>")
        pairs = []
        for r, s, c in zip(d_shown, s_shown, c_shown):
            if s < 0:
                pairs.append(f"<figure class='pair' data-key='{int(keys[r])}' data-suppressor-key='' "
                             f"data-cosine=''>{cell(r, 'dropped')}<figcaption>no kept face</figcaption></figure>")
                continue
            pairs.append(f"<figure class='pair' data-key='{int(keys[r])}' data-suppressor-key='{int(keys[s])}' "
                         f"data-cosine='{float(c):.9g}'>{cell(r, 'dropped')}{cell(s, 'suppressor')}"
                         f"<figcaption>cos {float(c):.4f}</figcaption></figure>")
        out.append("<div class='faces dropped'>" + "".join(pairs) + _more(len(d) - len(d_shown), "dropped")
                   + "</div></section>")
    return "\n".join(out)


def _numbers_table(numbers):
    return numbers_table(numbers)


def _more(n, what):
    return f"<span class='more'>+{n} more {what}</span>" if n > 0 else ""


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.subplots(figsize=(5, 3.5))


def _png(plt, fig):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return buf.getvalue()


def _histogram_png(cos, threshold):
    plt, (fig, ax) = _figure()
    if len(cos):
        ax.hist(cos, bins=60, color="C1")
    else:
        ax.text(0.5, 0.5, "no dropped face", ha="center", transform=ax.transAxes)
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls="--", label=f"threshold {threshold:.3f}")
        ax.legend()
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("cosine of a dropped face to its suppressor")
    ax.set_ylabel("dropped faces")
    return _png(plt, fig)


def retention_png(labels, kept):
    """Fraction kept by identity size, as select plots it."""
    from .report import _retention_by_size, retention_axes
    xs, ys = _retention_by_size(np.asarray(labels, np.int64), np.flatnonzero(kept))
    plt, (fig, ax) = _figure()
    retention_axes(ax, xs, ys, float(kept.mean()))
    return _png(plt, fig)


def summary_numbers(info):
    """(name, value) rows of a selection summary (the .json beside the index)."""
    info = dict(info)
    if isinstance(info.get("dataset"), dict):
        info["dataset"] = {k: v for k, v in info["dataset"].items() if k != "label_sample"}
    return list(info.items())


def selection_writer(rec_dir, features, labels, keys, offsets, sel, out, *, ids=GALLERY_IDS, seed=0, centers=None,
                     log=None):
    """``write(path, info, png_paths)`` for :func:`.report.write_selection`: the page of the selection
    written to the index ``out``. Suppressors follow the selection's ranking (its order, ``centers``
    and ``seed``). A page that cannot be built (an unreadable record, say) costs the selection
    nothing: the page then holds the numbers and the reason, and ``log`` says so."""
    from .nms import Ranker
    ranker = Ranker(sel.order, centers, seed, device="cpu") if sel.method in ("nms", "local") else None

    def write(path, info, png_paths):
        try:
            page = _selection_page(path, info, png_paths)
        except (ValueError, OSError, RuntimeError, ImportError) as exc:
            from .guards import describe
            reason = describe(exc)
            if log:
                log(f"the page {os.path.splitext(out)[0]}.html shows no faces: {reason}; the selection is "
                    f"written; build the page again with python -m plugins.face_nms gallery")
            page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(os.path.basename(out))}</title>"
                    f"</head><body><h1>Face-NMS selection: {_e(os.path.basename(out))}</h1><p id='no-faces'>"
                    f"No faces shown: {_e(reason)}</p>{_numbers_table(summary_numbers(info))}</body></html>")
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)

    def _selection_page(path, info, png_paths):
        kept = np.zeros(len(labels), bool)
        kept[sel.keep] = True
        plots = []
        for p, cap in zip(png_paths, ("retention by identity size", "cosine of each kept face to its nearest kept "
                                                                     "face of the same identity (a sample of "
                                                                     "identities)")):
            with open(p, "rb") as f:
                plots.append((cap, f.read()))
        threshold = sel.threshold if sel.method in ("nms", "local") else None
        return build_page(rec_dir, features, labels, keys, offsets, kept, threshold=threshold,
                          numbers=[("dataset folder", os.path.abspath(getattr(rec_dir, "path", rec_dir)))] +
                          summary_numbers(info),
                          plots=plots, ids=ids, seed=seed, title=f"Face-NMS selection: {os.path.basename(out)}",
                          ranker=ranker)
    return write


def write_index_page(rec_dir, feature_dir, index, out, *, ids=GALLERY_IDS, seed=0):
    """The page of any filtered index of ``rec_dir`` (select's, proxy-subset's, a random one), written
    atomically to ``out``; T is read from the selection summary beside the index when it is one of
    this dataset. Returns a one-line report."""
    from .datasets import open_dataset
    from .features import load_features
    from .files import reading_set
    from .filter import _summary, check_index_dataset
    ds = open_dataset(rec_dir)
    feats, labels, fkeys, _ = load_features(feature_dir, ds)
    with reading_set(index):  # the index and its summary, of one set
        rows = ds.subset_rows(index)
        check_index_dataset(index, ds, ds.keys[rows])
        summary_path, info = _summary(index)
    keys, offsets = ds.keys, None
    kept = np.zeros(len(keys), bool)
    kept[rows] = True
    labels = np.asarray(labels, np.int64)
    is_summary = isinstance(info, dict) and (isinstance(info.get("dataset"), dict) or
                                             {"total", "kept", "kept_per_identity_histogram"} <= set(info))
    threshold = None
    if is_summary and info.get("method") in ("nms", "local") and isinstance(info.get("threshold"), (int, float)) \
            and not isinstance(info.get("threshold"), bool):
        threshold = float(info["threshold"])
    present = np.bincount(labels) > 0
    numbers = [("dataset folder", os.path.abspath(rec_dir)), ("index", os.path.abspath(index)),
               ("kept", int(kept.sum())), ("total", len(kept)), ("kept_fraction", float(kept.mean())),
               ("identities", int(present.sum())),
               ("identities with no kept face", int((present & (np.bincount(labels[kept], minlength=len(present))
                                                                == 0)).sum()))]
    if is_summary:
        numbers.append(("summary", summary_path))
        numbers += [(k, v) for k, v in summary_numbers(info) if k not in ("kept", "total", "kept_fraction",
                                                                           "identities")]
    page = build_page(ds, feats, labels, keys, offsets, kept, threshold=threshold, numbers=numbers,
                      plots=[("retention by identity size", retention_png(labels, kept))], ids=ids, seed=seed,
                      title=f"Face-NMS gallery: {os.path.basename(index)}")
    with output_set([out], [".html"]) as tmps, open(tmps[0], "w", encoding="utf-8") as f:
        f.write(page)
    t = f"threshold {threshold:.4f}" if threshold is not None else "no threshold (not a selection summary)"
    return (f"wrote {out}: {int(kept.sum())} of {len(kept)} faces kept by {index}, {t}, "
            f"{min(ids, int(present.sum()))} identities shown")
