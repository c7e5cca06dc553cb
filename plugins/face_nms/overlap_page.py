"""The overlap page: per evaluation .bin, each matched training identity beside the evaluation images that matched.

The threshold and its rule come first. Per ``.bin``, one row per matched training identity (the
highest cosine first, up to ``rows``; the rest counted): its label and size, up to
``FACES_PER_IDENTITY`` of its training faces (decoded from ``train.rec``) and the evaluation
images that matched it (decoded from the ``.bin`` as the host loads them), each with its index,
its pair and its cosine to the identity's center. The rows are the report's, with its values.
"""
import os

import numpy as np

from .page_parts import CONTROLS, FACES_PER_IDENTITY, e, head, img, more, record_thumbnails, rows_of, spread, thumbnail, warnings_html

PAGE_ROWS = 200


def overlap_page(title, report, bins, sets, labels, keys, dataset, rows=PAGE_ROWS):
    """The page's HTML. ``report``: the overlap report (its ``bins`` entries in the order of ``bins``,
    the :class:`.eval_bin.EvalBin` objects); ``sets``: per bin the (image, label, cosine) arrays of
    every match; ``labels``/``keys``: one per feature row of ``dataset`` (a path or a :mod:`.datasets` object)."""
    from .eval_bin import decode
    shown = []
    for entry in report["bins"]:
        per = sorted(entry["identities"], key=lambda x: (-x["cosine"], x["label"]))
        shown.append(per[:rows])
    groups = rows_of(labels, {x["label"] for per in shown for x in per})
    sample = {lab: spread(r) for lab, r in groups.items()}
    try:
        thumbs = record_thumbnails(dataset, np.concatenate(list(sample.values())) if sample else [])
        reason = None
    except (ValueError, OSError) as exc:
        from .guards import describe
        thumbs, reason = {}, describe(exc)
    rule = report["threshold_rule"]
    if rule.get("rule") == "given":
        why = "given with --threshold"
    else:
        why = (f"the robust equal-error point of the training set's own cosines for this model: genuine (a face "
               f"to its identity's center without it) median {rule['genuine_median']:.3f}, spread "
               f"{rule['genuine_spread']:.3f}; impostor (a face to the nearest other center) median "
               f"{rule['impostor_median']:.3f}, spread {rule['impostor_spread']:.3f}; t lies as many spreads "
               f"above the impostor median as below the genuine one ({rule['separation']:.1f} each); at t "
               f"{rule['false_match_rate']:.2%} of impostors match and {rule['false_non_match_rate']:.2%} of "
               f"genuine faces miss")
    t = report["totals"]
    parts = [head(title, script=True),
             f"<p class='rule' id='threshold' data-threshold='{report['threshold']!r}'>An evaluation image matches a "
             f"training identity when its cosine to the identity's center (the normalised mean of its features) is "
             f"at least <b>t = {report['threshold']:.4f}</b> ({e(why)}).</p>",
             f"<p class='rule'>{t['identities']:,} training identities ({t['training_faces_of_them']:,} training "
             f"faces) match {t['matched_images']:,} of {t['evaluation_images']:,} evaluation images. They make the "
             f"verification accuracy optimistic; <code>--exclude</code> writes the training index without them. "
             f"Per row: the training identity's faces (record keys under them), then the evaluation images that "
             f"matched it (image index, its pair, cosine).</p>"]
    parts.append(warnings_html(report.get("warnings")))
    if reason:
        parts.append(f"<p id='no-faces'>No training faces shown: {e(reason)}</p>")
    parts.append(CONTROLS)
    for b, entry, per, (ev_rows, ev_labels, ev_cos) in zip(bins, report["bins"], shown, sets):
        name = os.path.basename(entry["bin"])
        parts.append(f"<h2 class='bin' data-bin='{e(entry['bin'])}'>{e(name)}: {len(per):,} of "
                     f"{len(entry['identities']):,} matched identities shown, {entry['matched_images']:,} of "
                     f"{entry['images']:,} images matched ({entry['pairs']:,} pairs)</h2>"
                     f"<table class='rows' data-bin='{e(entry['bin'])}'><thead><tr><th>#</th><th>cosine</th>"
                     f"<th>training identity</th><th>evaluation images that matched it</th></tr></thead><tbody>")
        cos_of = {(int(i), int(lab)): float(c) for i, lab, c in zip(ev_rows, ev_labels, ev_cos)}
        for n, x in enumerate(per, 1):
            lab = x["label"]
            faces = "".join(img(thumbs[r], "training", f"key {int(keys[r])}", f"{int(keys[r])}")
                            for r in sample[lab] if r in thumbs)
            images = x["image_indices"][:FACES_PER_IDENTITY]
            evs = "".join(img(thumbnail(decode(b, i)), "evaluation", f"image {i}",
                              f"image {i} (pair {i // 2})<br>cos {cos_of[(i, lab)]:.4f}") for i in images)
            parts.append(f"<tr class='match' data-label='{lab}' data-cosine='{x['cosine']!r}' "
                         f"data-images='{' '.join(str(i) for i in x['image_indices'])}'><td class='num'>{n}</td>"
                         f"<td class='num'>{x['cosine']:.4f}</td><td><div class='who'>identity {lab}</div>"
                         f"<div class='small'>{len(groups[lab]):,} training face{'s' if len(groups[lab]) != 1 else ''}</div><div class='faces'>{faces}"
                         f"{more(len(groups[lab]) - len(sample[lab]), 'faces')}</div></td><td><div class='faces'>"
                         f"{evs}{more(len(x['image_indices']) - len(images), 'images')}</div></td></tr>")
        parts.append("</tbody></table>")
        if len(entry["identities"]) > len(per):
            parts.append(f"<p class='more'>{len(entry['identities']) - len(per):,} more matched identities of "
                         f"{e(name)} are in the report</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
