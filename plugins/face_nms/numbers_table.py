"""A summary's numbers as a page shows them: named in words, rounded, tables for the tables.

The per-identity histogram and the threshold search become small labelled tables, quantiles a
line of percentiles, fractions percentages, digests their first 12 hex digits. The JSON beside
the index keeps every figure at full precision.
"""
import re

from .page_parts import e

NAMES = {
    "dataset folder": "dataset folder", "index": "index", "summary": "summary file",
    "method": "method", "order": "ranking order", "threshold": "threshold T (NMS cosine)",
    "kept": "faces kept", "total": "faces in the dataset", "kept_fraction": "fraction kept",
    "identities": "identities", "identities with no kept face": "identities with no kept face",
    "identities_kept": "identities with a kept face",
    "kept_per_identity_histogram": "identities by faces kept",
    "nearest_kept_cosine_quantiles": "cosine of a kept face to its nearest kept face of the identity",
    "threshold_search": "threshold search (kept fraction of every threshold tried, on all faces)",
    "dataset": "dataset", "train_idx_sha256": "train.idx sha256", "train_rec_bytes": "train.rec size",
    "sources": "combined from", "removed": "faces removed", "removed_by_it_alone": "removed by it alone",
    "removed_identities": "identities removed", "removed_faces": "faces removed", "mode": "mode",
    "dropped_faces": "faces dropped", "kept_faces": "faces kept", "dropped_identities": "identities dropped",
    "conflicts_report": "conflicts report", "overlap_report": "overlap report",
}
HIST_COLUMNS = 16


def numbers_table(numbers):
    """``numbers``: (name, value) pairs of a run, as an HTML table."""
    rows = "".join(f"<tr data-name='{e(k)}'><th>{e(_name(k))}</th><td>{_value(k, v)}</td></tr>" for k, v in numbers)
    return f"<table class='numbers'>{rows}</table>"


def _name(key):
    return NAMES.get(key, str(key).replace("_", " "))


def _value(key, value):
    if key == "kept_per_identity_histogram" and isinstance(value, dict):
        return _histogram(value)
    if key == "threshold_search" and isinstance(value, list):
        return _search(value)
    if key.endswith("quantiles") and isinstance(value, dict):
        return e(", ".join(f"{_percentile(q)} {_number('', v)}" for q, v in value.items())) if value else "none"
    if key == "warnings" and isinstance(value, list):
        return "<br>".join(e(str(w)) for w in value) if value else "none"
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        return _records(value)
    if isinstance(value, dict):
        return "<br>".join(f"{e(_name(k))}: {_value(k, v)}" for k, v in value.items() if k != "label_sample")
    return e(_number(key, value))


def _number(key, value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return _bytes(value) if key.endswith("_bytes") else f"{value:,}"
    if isinstance(value, float):
        return f"{value:.1%}" if key.endswith("fraction") else f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if value is None:
        return "none"
    text = str(value)
    if re.fullmatch(r"[0-9a-f]{40,}", text):
        return text[:12] + "…"
    return text


def _bytes(n):
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{n:,} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({n:,} bytes)"
        size /= 1000


def _percentile(q):
    p = float(q) * 100
    return "median" if p == 50 else f"{p:g}th percentile"


def _histogram(hist):
    items = sorted(((int(k), int(v)) for k, v in hist.items()))
    shown, rest = items[:HIST_COLUMNS], items[HIST_COLUMNS:]
    head = "".join(f"<td>{k:,}</td>" for k, _ in shown)
    body = "".join(f"<td>{v:,}</td>" for _, v in shown)
    if rest:
        head += f"<td>{rest[0][0]:,} to {rest[-1][0]:,}</td>"
        body += f"<td>{sum(v for _, v in rest):,}</td>"
    return (f"<table class='histogram'><tr><th>faces kept</th>{head}</tr><tr><th>identities</th>{body}</tr></table>")


def _search(pairs):
    rows = "".join(f"<tr><td>{float(t):.5f}</td><td>{float(f):.2%}</td></tr>" for t, f in sorted(pairs))
    return (f"<details class='search'><summary>{len(pairs)} thresholds tried</summary><div class='search'>"
            f"<table class='search'><tr><th>threshold</th><th>kept fraction</th></tr>{rows}</table></div></details>")


def _records(items):
    cols = list(dict.fromkeys(k for x in items for k in x))
    head = "".join(f"<th>{e(_name(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{e(_number(c, x.get(c, '')))}</td>" for c in cols) + "</tr>" for x in items)
    return f"<table class='records'><tr>{head}</tr>{body}</table>"
