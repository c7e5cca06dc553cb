"""The conflicts page: each conflicting pair of identities with faces of both, to review before ``--drop``.

One row per pair (most similar first, up to ``rows``; the rest counted): both labels, their sizes,
the cosine of their centers, and up to ``FACES_PER_IDENTITY`` faces of each identity spread over
its records, so that "same person" or "not" is a glance. Then the faces nearer another identity's
center than their own (``_faces.csv``, most similar first), each beside ``FLAGGED_SIDE`` faces of
its own identity and of the other one. Rows are filtered and sorted by cosine in the page (inline script, nothing
fetched). The rows are those of the CSV tables, with the same rounded values.
"""
import numpy as np

from .page_parts import CONTROLS, FACES_PER_IDENTITY, e, head, img, more, record_thumbnails, rows_of, spread, warnings_html

PAGE_ROWS = 200
FLAGGED_SIDE = 4  # faces of each identity beside a flagged face (three images of 64 px fit a row)


def conflicts_page(title, info, pairs, faces, face_rows, labels, keys, dataset, rows=PAGE_ROWS, log=None):
    """The page's HTML. ``pairs``/``faces``: the rows of ``_pairs.csv``/``_faces.csv`` (dicts);
    ``face_rows``: the feature row of each flagged face; ``labels``/``keys``: one per
    feature row (the face records of ``dataset``, a path or a :mod:`.datasets` object, in its order); ``rows``: rows shown per table.
    A record that cannot be decoded costs the faces only: the page holds the tables and says why,
    and ``log`` is told."""
    labels = np.asarray(labels, np.int64)
    shown_pairs = pairs[:rows]
    order = sorted(range(len(faces)), key=lambda i: (-faces[i]["cosine_other"], faces[i]["key"]))[:rows]
    shown_faces = [(faces[i], int(face_rows[i])) for i in order]
    wanted = {p["label_a"] for p in shown_pairs} | {p["label_b"] for p in shown_pairs}
    wanted |= {f["label"] for f, _ in shown_faces} | {f["other_label"] for f, _ in shown_faces}
    groups = rows_of(labels, wanted)
    sample = {lab: spread(r) for lab, r in groups.items()}
    need = [r for r in sample.values()] + [np.array([r for _, r in shown_faces], np.int64)]
    # the flagged face's own side shows other faces of its identity: one more in reserve
    need += [spread(groups[f["label"]], FACES_PER_IDENTITY + 1) for f, _ in shown_faces]
    try:
        thumbs = record_thumbnails(dataset, np.concatenate(need) if need else [])
        reason = None
    except (ValueError, OSError) as exc:
        from .guards import describe
        thumbs, reason = {}, describe(exc)
        if log:
            log(f"the page shows no faces: {reason}; the tables are written")

    def faces_of(label, role, skip=None, pick=None, n=FACES_PER_IDENTITY):
        rs = [r for r in (pick if pick is not None else sample[label]) if r != skip][:n]
        out = "".join(img(thumbs[r], role, f"key {int(keys[r])}", f"{int(keys[r])}") for r in rs if r in thumbs)
        n = len(groups[label]) - (1 if skip is not None else 0) - len(rs)
        return f"<div class='faces'>{out}{more(n, 'faces')}</div>"

    rule = info["threshold_rule"]
    if rule.get("rule") == "given":
        why = "given with --threshold"
    else:
        why = (f"{rule['rule']}: median {rule['median']:.3f}, robust standard deviation {rule['robust_sigma']:.4f}, "
               f"z = {rule['z']:g}")
    parts = [head(title, script=True),
             f"<p class='rule' id='threshold' data-threshold='{info['threshold']!r}'>Two identities conflict when "
             f"the cosine of their centers (normalised mean features) exceeds the threshold <b>T = "
             f"{info['threshold']:.4f}</b> ({e(why)}).</p>",
             f"<p class='rule'>{info['pairs']:,} conflicting pairs among {info['identities']:,} identities "
             f"({info['faces']:,} faces); {info['flagged_faces']:,} faces nearer another identity's center than "
             f"their own. Each pair is most likely one person under two labels: look at both sides (up to "
             f"{FACES_PER_IDENTITY} faces each, record keys under them). "
             f"<code>--drop</code> removes the smaller identity of each pair (marked), "
             f"<code>--drop-mode faces</code> the flagged faces.</p>"]
    parts.append(warnings_html(info.get("warnings")))
    if reason:
        parts.append(f"<p id='no-faces'>No faces shown: {e(reason)}</p>")
    parts.append(CONTROLS)
    parts.append(f"<h2>Pairs, most similar first ({len(shown_pairs):,} of {len(pairs):,})</h2>"
                 "<table class='rows' id='pairs'><thead><tr><th>#</th><th>cosine</th><th>identity A</th>"
                 "<th>identity B</th></tr></thead><tbody>")
    for i, p in enumerate(shown_pairs, 1):
        a, b = p["label_a"], p["label_b"]
        smaller = b if p["size_b"] <= p["size_a"] else a

        def side(label, size):
            mark = " <span class='small'>(smaller: --drop removes it)</span>" if label == smaller else ""
            return (f"<td><div class='who'>identity {label}</div><div class='small'>{size:,} "
                    f"face{'s' if size != 1 else ''}{mark}</div>"
                    f"{faces_of(label, 'identity-' + ('a' if label == a else 'b'))}</td>")
        parts.append(f"<tr class='pair' data-label-a='{a}' data-label-b='{b}' data-size-a='{p['size_a']}' "
                     f"data-size-b='{p['size_b']}' data-cosine='{p['cosine']!r}'><td class='num'>{i}</td>"
                     f"<td class='num'>{p['cosine']:.4f}</td>{side(a, p['size_a'])}{side(b, p['size_b'])}</tr>")
    parts.append("</tbody></table>" + (f"<p class='more' id='pairs-more'>{len(pairs) - len(shown_pairs):,} more "
                                       f"pairs, less similar, are in the _pairs.csv table</p>"
                                       if len(pairs) > len(shown_pairs) else ""))
    parts.append(f"<h2>Faces nearer another identity's center, most similar first ({len(shown_faces):,} of "
                 f"{len(faces):,})</h2><p class='legend'>Each flagged face (red frame), its cosine to its own "
                 f"identity's center (computed without it) and to the other identity's center, beside up to "
                 f"{FLAGGED_SIDE} faces of each.</p><table class='rows' id='faces'><thead><tr><th>#</th><th>cosine own / other</th>"
                 f"<th>flagged face</th><th>its identity</th><th>the other identity</th></tr></thead><tbody>")
    for i, (f, r) in enumerate(shown_faces, 1):
        own_pick = spread(groups[f["label"]], FACES_PER_IDENTITY + 1)
        face = img(thumbs[r], "flagged", f"key {f['key']}", f"{f['key']}") if r in thumbs else ""
        parts.append(f"<tr class='face' data-key='{f['key']}' data-label='{f['label']}' "
                     f"data-other-label='{f['other_label']}' data-cosine-own='{f['cosine_own']!r}' "
                     f"data-cosine='{f['cosine_other']!r}'><td class='num'>{i}</td><td class='num'>"
                     f"{f['cosine_own']:.4f} / {f['cosine_other']:.4f}</td><td><div class='faces'>{face}</div></td>"
                     f"<td><div class='who'>identity {f['label']}</div>"
                     f"{faces_of(f['label'], 'own', r, own_pick, FLAGGED_SIDE)}</td>"
                     f"<td><div class='who'>identity {f['other_label']}</div>"
                     f"{faces_of(f['other_label'], 'other', n=FLAGGED_SIDE)}</td></tr>")
    parts.append("</tbody></table>" + (f"<p class='more' id='faces-more'>{len(faces) - len(shown_faces):,} more "
                                       f"flagged faces are in the _faces.csv table</p>"
                                       if len(faces) > len(shown_faces) else ""))
    parts.append("</body></html>")
    return "\n".join(parts)
