"""Face-NMS core-set selection (Chen et al., 2021).

Per identity, faces are ranked by their contribution to global sparsity (cosine to the
identity center, hard faces first), then suppressed NMS-style: a face is dropped when its
cosine with an already kept face of the same identity exceeds the threshold (local sparsity).

Identities are streamed: rows are grouped by identity (a regrouping pass writes a grouped copy
of a memory-mapped feature file whose identities are scattered, as in im2rec-packed
datasets), read one block of identities at a time, and processed in batches of identities of
similar size with batched matrix products, on the GPU when one is given. Memory is bounded by
one block (``chunk_rows`` rows, or the largest identity) plus a few dozen bytes of bookkeeping
per face (label, grouping order, kept rows), never by N x d.
"""
import contextlib
import mmap
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .proxy_subset import check_ratio, per_identity_quota, random_subset, rank_within_identity

ORDERS = ("hard-first", "easy-first", "random")
METHODS = ("nms", "random", "global", "local")
RATIO_TOLERANCE = 0.005
TIE_SCALE = float(1 << 20)


@dataclass
class Selection:
    """Result of a selection: ``keep`` holds the sorted kept row indices."""
    keep: np.ndarray
    threshold: float = None
    method: str = "nms"
    order: str = "hard-first"
    total: int = 0
    nn_cos: np.ndarray = None  # max cosine of a kept face to another kept face of its identity
    nn_rows: np.ndarray = None  # the kept rows nn_cos is given for: all (keep), or a sample of identities
    search: list = field(default_factory=list)  # (threshold, kept fraction) evaluated by a ratio search
    passes: int = 1  # streamed passes over the features

    @property
    def kept(self):
        return len(self.keep)

    @property
    def fraction(self):
        return self.kept / self.total if self.total else 0.0


def _check_inputs(features, labels, centers):
    if features.ndim != 2:
        raise ValueError(f"features must be an N x d array, got shape {features.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"labels must have one entry per feature row: {labels.shape} labels for "
                         f"{len(features)} features")
    if len(labels) == 0:
        raise ValueError("the dataset is empty: no features to select from")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.floor(labels)):
            raise ValueError("labels must be integer identity ids")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {labels.min()}")
    if centers is not None:
        centers = np.asarray(centers, np.float32)
        if centers.ndim != 2 or centers.shape[1] != features.shape[1] or len(centers) <= labels.max():
            raise ValueError(f"centers must be a (num_classes x {features.shape[1]}) array covering label "
                             f"{labels.max()}, got shape {centers.shape}")
    return labels, centers


class _Groups:
    """Identity groups of a feature array, read in blocks of whole identities."""

    def __init__(self, features, labels, chunk_rows, workdir=None, regroup=None):
        self.features, self.chunk_rows = features, chunk_rows
        n = len(labels)
        change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
        starts = np.concatenate([[0], change])
        run_labels = labels[starts]
        self.order = None
        self.grouped = features
        self._tmp = None
        self._fd = None
        if len(np.unique(run_labels)) != len(run_labels):
            # identities scattered through the rows: group them once
            self.order = np.argsort(labels, kind="stable")
            sorted_labels = labels[self.order]
            starts = np.concatenate([[0], np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1])
            run_labels = sorted_labels[starts]
            if regroup is None:
                regroup = isinstance(features, np.memmap) and features.nbytes > _available_memory() // 2
            if regroup:
                # out of core: random reads by identity would thrash, write a grouped copy once
                self.grouped = self._regroup(workdir)
        self.starts = starts
        self.sizes = np.diff(np.append(starts, n))
        self.group_labels = run_labels

    def _regroup(self, workdir):
        """Streams the features once and writes them grouped by identity to a temporary file."""
        src = self.features
        workdir = workdir or os.path.dirname(os.path.abspath(src.filename))
        self._tmp = os.path.join(workdir, f".grouped-{os.getpid()}.f{src.dtype.itemsize * 8}")
        dst = np.memmap(self._tmp, dtype=src.dtype, mode="w+", shape=src.shape)
        pos = np.empty(len(self.order), np.int64)
        pos[self.order] = np.arange(len(self.order))
        for s in range(0, len(src), self.chunk_rows):
            e = min(s + self.chunk_rows, len(src))
            block = np.asarray(src[s:e])
            dst[pos[s:e]] = block
            _release(src)
            _release(dst)
        del pos
        return dst

    def _gather(self, rows):
        """Rows of the features as float32; from a memory-mapped file by positioned reads. Touching
        scattered rows through the mapping instead maps far more than the rows (fault-around and
        large page-cache folios: ~1 MB per touched row was measured on Linux 6.18), so resident
        memory would grow with the file."""
        src = self.features
        if not isinstance(src, np.memmap) or getattr(src, "filename", None) is None:
            return np.asarray(src[rows], dtype=np.float32)
        if self._fd is None:
            self._fd = os.open(src.filename, os.O_RDONLY)
        order = np.argsort(rows, kind="stable")
        r = rows[order]
        row_bytes = src.shape[1] * src.dtype.itemsize
        buf = np.empty((len(r), src.shape[1]), src.dtype)
        view = memoryview(buf).cast("B")
        cut = np.flatnonzero(np.diff(r) != 1) + 1
        for a, b in zip(np.concatenate([[0], cut]).tolist(), np.append(cut, len(r)).tolist()):
            os.preadv(self._fd, [view[a * row_bytes:b * row_bytes]], src.offset + int(r[a]) * row_bytes)
        out = np.empty((len(r), src.shape[1]), np.float32)
        out[order] = buf
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            del self.grouped
            os.remove(self._tmp)
            self._tmp = None

    def rows(self, s, e):
        """Original row indices of grouped positions s..e."""
        return np.arange(s, e) if self.order is None else self.order[s:e]

    def row_of(self, positions):
        """Original row indices of grouped positions."""
        return np.asarray(positions, np.int64) if self.order is None else self.order[positions]

    def blocks(self, subset=None):
        """(group indices, their row offsets in the block, block features as float32), in grouped order.

        ``subset``: sorted group indices to read instead of all groups.
        """
        gids_all = np.arange(len(self.starts)) if subset is None else np.asarray(subset)
        i = 0
        while i < len(gids_all):
            j, total = i + 1, self.sizes[gids_all[i]]
            while j < len(gids_all) and total + self.sizes[gids_all[j]] <= self.chunk_rows:
                total += self.sizes[gids_all[j]]
                j += 1
            gids = gids_all[i:j]
            contiguous = gids[-1] - gids[0] == len(gids) - 1
            s, e = self.starts[gids[0]], self.starts[gids[-1]] + self.sizes[gids[-1]]
            if contiguous:
                positions = None
                offsets = self.starts[gids] - s
            else:
                positions = np.concatenate([np.arange(self.starts[g], self.starts[g] + self.sizes[g]) for g in gids])
                offsets = np.concatenate([[0], np.cumsum(self.sizes[gids])[:-1]])
            if self.order is None or self.grouped is not self.features:
                block = self.grouped[s:e] if positions is None else self.grouped[positions]
                block = np.asarray(block, dtype=np.float32)
                _release(self.grouped)
            else:
                block = self._gather(self.order[s:e] if positions is None else self.order[positions])
            if not np.isfinite(block).all():
                bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
                pos = s + bad if positions is None else positions[bad]
                raise ValueError(f"features contain non-finite values (row {int(self.row_of([pos])[0])}); "
                                 f"extract them again")
            yield gids, offsets, block
            i = j


@contextlib.contextmanager
def _exact_matmul():
    """Full float32 matrix products: TF32 (allowed by some set-ups on Ampere and later GPUs)
    moves cosines by ~1e-3, enough to flip NMS decisions near the threshold."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _available_memory():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62


def _release(array):
    """Drops a memory-mapped array's pages from this process (they stay in the page cache), so that
    resident memory stays bounded by a block however much of the file has been streamed."""
    mm = getattr(array, "_mmap", None)
    if isinstance(array, np.memmap) and mm is not None and hasattr(mm, "madvise"):
        # shared file pages keep their (dirty) contents in the page cache: no msync needed
        mm.madvise(mmap.MADV_DONTNEED)


def _splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return x ^ (x >> np.uint64(31))


def random_keys(rows, seed):
    """A uniform key in [0, 1) per row, a function of (seed, row) only."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.asarray(rows, np.uint64) ^ _splitmix(np.full(1, seed, np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _Engine:
    """Batched per-identity ranking and greedy NMS for several thresholds at once."""

    def __init__(self, order, centers, seed, device, budget=1 << 24, max_rows=1 << 14):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order, self.seed, self.budget, self.max_rows = order, seed, budget, max_rows
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.centers = None if centers is None else torch.from_numpy(centers)

    def batches(self, groups, gids, offsets, block, k=1):
        """Identities of a block padded into batches of similar size: (gids, m, X, valid, rows)."""
        sizes = groups.sizes[gids]
        offset_of = dict(zip(gids.tolist(), np.asarray(offsets).tolist()))
        multi = gids[sizes > 1]
        multi = multi[np.argsort(groups.sizes[multi], kind="stable")]
        i = 0
        while i < len(multi):
            m = int(groups.sizes[multi[i]])
            cap = int(np.ceil(m * 1.25 / 8) * 8)
            j = i + 1
            # bounded: k x B x m x m comparison flags and B x m x d features per batch
            limit = max(1, min(self.budget // (k * cap * cap), self.max_rows // cap))
            while j < len(multi) and groups.sizes[multi[j]] <= cap and j - i < limit:
                j += 1
            batch = multi[i:j]
            m = int(groups.sizes[batch].max())
            X = np.zeros((len(batch), m, block.shape[1]), np.float32)
            valid = np.zeros((len(batch), m), bool)
            rows = np.full((len(batch), m), -1, np.int64)
            for b, g in enumerate(batch):
                s = offset_of[int(g)]
                n = groups.sizes[g]
                X[b, :n] = block[s:s + n]
                valid[b, :n] = True
                rows[b, :n] = groups.rows(groups.starts[g], groups.starts[g] + n)
            yield batch, X, valid, rows
            i = j

    def rank(self, X, valid, rows, labels, pairwise=True):
        """In rank order: the pairwise cosines (B x m x m, when ``pairwise``), validity and rows."""
        # ranking in float64: faces tied in exact arithmetic (both faces of a two-face identity
        # are equally far from their mean) get scores equal to ~1e-16, which the 2^-20 grid
        # below makes exactly equal, so they rank by row index on every device and library
        X64 = torch.from_numpy(X).to(self.device, torch.float64)
        X64.div_(torch.linalg.vector_norm(X64, dim=2, keepdim=True).clamp_min_(1e-12))
        vt = torch.from_numpy(valid).to(self.device)
        if self.centers is None:
            c = torch.bmm(vt[:, None, :].to(X64.dtype), X64)[:, 0]
        else:
            c = self.centers[torch.from_numpy(labels)].to(self.device, torch.float64)
        c = torch.nn.functional.normalize(c, dim=1)
        score = torch.bmm(X64, c[:, :, None])[..., 0]
        if self.order == "hard-first":
            key = torch.round(score * TIE_SCALE)
        elif self.order == "easy-first":
            key = -torch.round(score * TIE_SCALE)
        else:
            key = torch.from_numpy(random_keys(np.maximum(rows, 0), self.seed)).to(self.device)
        key = key.masked_fill(~vt, float("inf"))
        # rows within an identity are increasing, so a stable sort breaks ties by row index
        perm = torch.sort(key, dim=1, stable=True).indices
        Ss = None
        if pairwise:
            # cosines before ranking, then rows and columns permuted: m x m per identity is
            # cheaper to move than the m x d features
            Xt = X64.float()
            S = torch.bmm(Xt, Xt.transpose(1, 2)).clamp_(-1.0, 1.0)
            m = S.shape[1]
            Ss = torch.gather(torch.gather(S, 1, perm[..., None].expand(-1, -1, m)), 2,
                              perm[:, None, :].expand(-1, m, -1))
        vs = torch.gather(vt, 1, perm)
        rs = torch.gather(torch.from_numpy(rows).to(self.device), 1, perm)
        return Ss, vs, rs

    @staticmethod
    def nms(S, vs, thresholds, fixed_point=None):
        """Kept mask (k x B x m) of greedy NMS in rank order, one per threshold, from the ranked
        pairwise cosines S (B x m x m) and validity vs.

        Greedy NMS keeps face i iff no kept face ranked before it has cosine above the threshold.
        Two exact evaluations: a step per rank position, or, since the rule depends only on
        earlier faces and so has exactly one fixed point, iterating it from "all kept" (at most m
        rounds, in practice a few, each one batched operation over all pairs). The second is
        faster for one threshold, the first for a grid of them.
        """
        t = torch.as_tensor(thresholds, dtype=S.dtype, device=S.device).view(-1, 1, 1, 1)
        k, m = len(thresholds), S.shape[1]
        over = S.unsqueeze(0) > t
        if fixed_point if fixed_point is not None else k <= 2:
            over &= torch.ones((m, m), dtype=torch.bool, device=S.device).triu_(1)  # [j, i]: j before i
            keep = vs.expand(k, -1, -1).clone()
            for _ in range(m):
                new = vs & ~(over & keep.unsqueeze(-1)).any(dim=-2)
                if torch.equal(new, keep):
                    break
                keep = new
            return keep
        suppressed = torch.zeros((k,) + vs.shape, dtype=torch.bool, device=S.device)
        for j in range(m - 1):
            alive = ~suppressed[:, :, j] & vs[:, j]
            suppressed[:, :, j + 1:] |= alive[..., None] & over[:, :, j, j + 1:]
        return ~suppressed & vs


def _nearest_kept(S, keep):
    """Max cosine of each kept face to another kept face of its identity (-inf when alone)."""
    pair = keep[:, :, None] & keep[:, None, :]
    eye = torch.eye(S.shape[1], dtype=torch.bool, device=S.device)
    masked = S.masked_fill(~pair | eye, float("-inf"))
    return masked.max(dim=2).values


def _pass(groups, engine, thresholds, want_keep, progress=None, subset=None, bits=None):
    """One streamed pass: kept counts per threshold, and for a single threshold the kept rows.

    ``bits``: a uint16 array of one entry per row, receiving bit i when the row is kept at thresholds[i].
    """
    counts = np.zeros(len(thresholds), np.int64)
    weights = (1 << torch.arange(len(thresholds), device=engine.device)).view(-1, 1, 1)
    kept_rows, kept_nn = [], []
    for gids, offsets, block in groups.blocks(subset):
        single = gids[groups.sizes[gids] == 1]
        counts += len(single)
        if bits is not None:
            bits[groups.row_of(groups.starts[single])] = (1 << len(thresholds)) - 1
        if want_keep and len(single):
            kept_rows.append(groups.row_of(groups.starts[single]))
            kept_nn.append(np.full(len(single), np.nan, np.float32))
        for batch, X, valid, rows in engine.batches(groups, gids, offsets, block, len(thresholds)):
            S, vs, rs = engine.rank(X, valid, rows, groups.group_labels[batch])
            keep = engine.nms(S, vs, thresholds)
            counts += keep.sum(dim=(1, 2)).cpu().numpy()
            if bits is not None:
                packed = (keep.int() * weights).sum(0)
                bits[rs[vs].cpu().numpy()] = packed[vs].cpu().numpy()
            if want_keep:
                nn = _nearest_kept(S, keep[0])
                sel = keep[0]
                kept_rows.append(rs[sel].cpu().numpy())
                nn_sel = nn[sel].cpu().numpy().astype(np.float32)
                nn_sel[~np.isfinite(nn_sel)] = np.nan
                kept_nn.append(nn_sel)
        if progress is not None:
            progress.update(len(block))
    if not want_keep:
        return counts, None, None
    rows = np.concatenate(kept_rows) if kept_rows else np.zeros(0, np.int64)
    nn = np.concatenate(kept_nn) if kept_nn else np.zeros(0, np.float32)
    order = np.argsort(rows)
    return counts, rows[order], nn[order]


def _refine(evaluate, ratio, lo, hi, tried, grid=16, rounds=6, tol=RATIO_TOLERANCE):
    """Grid refinement of the threshold whose kept fraction is closest to ``ratio``.

    ``evaluate(thresholds) -> fractions`` is one streamed pass for all the grid's thresholds.
    Returns the best threshold and the number of passes made.
    """
    passes = 0
    best = None
    for _ in range(rounds):
        todo = [float(t) for t in np.unique(np.linspace(lo, hi, grid)) if float(t) not in tried]
        if todo:
            tried.update(zip(todo, evaluate(np.array(todo))))
            passes += 1
        best = min(tried, key=lambda t: (abs(tried[t] - ratio), t))
        if abs(tried[best] - ratio) <= tol:
            break
        ts = sorted(tried)
        crossings = [(x, y) for x, y in zip(ts, ts[1:]) if tried[x] < ratio <= tried[y]]
        if not crossings:
            break  # outside what any threshold in [lo, hi] reaches
        lo, hi = min(crossings, key=lambda xy: abs(tried[xy[0]] - ratio) + abs(tried[xy[1]] - ratio))
        if hi - lo < 1e-7:
            break
    return best, passes


def _search_threshold(groups, labels, engine, ratio, progress_factory, sample_groups=20000, seed=0):
    """The global threshold whose kept fraction is closest to ``ratio`` (within 0.005 when achievable).

    On large sets the threshold is first located on a random sample of identities (cheap passes),
    then confirmed and refined on all identities, usually in one full pass.
    """
    n = len(labels)
    lo, hi = -1.0, 1.0
    multi = np.flatnonzero(groups.sizes > 1)
    passes = 0
    sample_groups = max(min(sample_groups, len(multi) // 20), 2000)
    if len(multi) > 2 * sample_groups:
        subset = np.sort(np.random.default_rng(seed).choice(multi, sample_groups, replace=False))
        single_rows = n - int(groups.sizes[multi].sum())
        scale = (n - single_rows) / int(groups.sizes[subset].sum())

        def estimate(ts):
            with progress_factory("threshold search (sample)") as bar:
                counts, _, _ = _pass(groups, engine, ts, False, bar, subset=subset)
            return (single_rows + counts * scale) / n

        sampled = {}
        _refine(estimate, ratio, lo, hi, sampled, tol=RATIO_TOLERANCE / 5)
        # bracket of the full search: where the sample's fraction curve crosses ratio -/+ 0.015
        ts = np.array(sorted(sampled))
        fr = np.maximum.accumulate(np.array([sampled[t] for t in ts]))
        lo, hi = (float(np.interp(ratio + d, fr + np.arange(len(fr)) * 1e-12, ts)) for d in (-0.015, 0.015))
        if not lo < hi:
            lo, hi = -1.0, 1.0

    last = {}

    def full(ts):
        bits = np.zeros(n, np.uint16)
        with progress_factory("threshold search") as bar:
            counts, _, _ = _pass(groups, engine, ts, False, bar, bits=bits)
        last.update(thresholds=[float(t) for t in ts], bits=bits)
        return counts / n

    tried = {}
    best, p = _refine(full, ratio, lo, hi, tried)
    passes += p
    if abs(tried[best] - ratio) > RATIO_TOLERANCE and (lo, hi) != (-1.0, 1.0):
        best, p = _refine(full, ratio, -1.0, 1.0, tried)  # the sample misled: search everything
        passes += p
    return best, sorted(tried.items()), passes, last


def _bar_factory(total, progress):
    if not progress:
        return lambda desc: contextlib.nullcontext()
    from tqdm import tqdm
    return lambda desc: tqdm(total=total, desc=desc, unit="face", unit_scale=True, smoothing=0.1)


@_exact_matmul()
def select_core_set(features, labels, *, threshold=None, ratio=None, order="hard-first", centers=None, seed=0,
                    device=None, chunk_rows=1 << 16, workdir=None, regroup=None, search_sample=20000,
                    progress=False):
    """Face-NMS selection.

    Args:
        features: N x d array (a memory-mapped float16 array is streamed, never loaded whole).
        labels: N identity labels.
        threshold: the NMS threshold on cosine similarity; a face is suppressed when its
            cosine with an already kept face of its identity exceeds it.
        ratio: instead of ``threshold``: the kept fraction wanted; the single global threshold
            reaching it (within 0.005, or the closest achievable) is searched and reported.
        order: "hard-first" (ascending cosine to the identity center: far faces carry the class
            boundary), "easy-first" (descending) or "random"; ties by row index.
        centers: optional num_classes x d identity centers (e.g. the proxy model's PartialFC
            weights) instead of the normalised mean feature.
        seed: seed of the "random" order.
        device: torch device of the matrix products (default: cuda when available).
        search_sample: with ``ratio``, identities sampled to locate the threshold before the
            passes over all identities (used when there are more than twice as many).
        regroup: write a grouped copy of a memory-mapped feature file whose identities are
            scattered (default: when the file exceeds half the available memory, where random
            reads by identity would go to disk).

    Returns:
        Selection with ``.keep`` (sorted kept rows) and ``.threshold``.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("give exactly one of threshold= or ratio=")
    if ratio is not None:
        check_ratio(ratio)
    elif not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite cosine, got {threshold!r}")
    labels, centers = _check_inputs(features, labels, centers)
    engine = _Engine(order, centers, seed, device)
    groups = _Groups(features, labels, chunk_rows, workdir, regroup)
    bars = _bar_factory(len(labels), progress)
    try:
        search, passes, last = [], 0, {}
        if ratio is not None:
            threshold, search, passes, last = _search_threshold(groups, labels, engine, ratio, bars, search_sample,
                                                                seed)
        if threshold in last.get("thresholds", ()):
            # the last search pass already decided every face at this threshold; the nearest kept
            # neighbour cosines (for the report) come from a sample of identities
            i = last["thresholds"].index(threshold)
            keep = np.flatnonzero((last["bits"] >> i) & 1)
            multi = np.flatnonzero(groups.sizes > 1)
            sample = np.sort(np.random.default_rng(seed).choice(multi, min(len(multi), search_sample), replace=False))
            _, nn_rows, nn = _pass(groups, engine, np.array([threshold]), True, subset=sample)
        else:
            with bars("select") as bar:
                _, keep, nn = _pass(groups, engine, np.array([threshold]), True, bar)
            nn_rows = keep
            passes += 1
    finally:
        groups.close()
    return Selection(keep=keep, threshold=float(threshold), method="nms" if order != "random" else "local",
                     order=order, total=len(labels), nn_cos=nn, nn_rows=nn_rows, search=search, passes=passes)


@_exact_matmul()
def global_only(features, labels, *, ratio, order="hard-first", centers=None, seed=0, device=None,
                chunk_rows=1 << 16, workdir=None):
    """Ablation: rank each identity (global sparsity), keep its top share, no NMS."""
    check_ratio(ratio)
    labels, centers = _check_inputs(features, labels, centers)
    engine = _Engine(order, centers, seed, device)
    groups = _Groups(features, labels, chunk_rows, workdir)
    rank_key = np.zeros(len(labels))
    try:
        for gids, offsets, block in groups.blocks():
            for batch, X, valid, rows in engine.batches(groups, gids, offsets, block):
                _, vs, rs = engine.rank(X, valid, rows, groups.group_labels[batch], pairwise=False)
                pos = torch.arange(vs.shape[1], device=vs.device).expand_as(vs)
                rank_key[rs[vs].cpu().numpy()] = pos[vs].cpu().numpy()
    finally:
        groups.close()
    quota = per_identity_quota(np.bincount(labels), ratio)
    keep = np.flatnonzero(rank_within_identity(labels, rank_key) < quota[labels])
    return Selection(keep=keep, method="global", order=order, total=len(labels))


def random_baseline(labels, *, ratio, seed=0):
    """Ablation: a random per-identity sample of the same ratio."""
    labels = np.asarray(labels, np.int64)
    return Selection(keep=random_subset(labels, ratio, seed), method="random", order="random", total=len(labels))


def run_method(method, features, labels, *, ratio=None, threshold=None, order="hard-first", **kw):
    """One of METHODS: "nms" (Face-NMS), "random", "global" (global-only), "local" (NMS in random order)."""
    if method == "nms":
        return select_core_set(features, labels, ratio=ratio, threshold=threshold, order=order, **kw)
    if method == "local":
        return select_core_set(features, labels, ratio=ratio, threshold=threshold, order="random", **kw)
    if ratio is None:
        raise ValueError(f"method {method!r} needs ratio=")
    if method == "global":
        return global_only(features, labels, ratio=ratio, order=order, **kw)
    if method == "random":
        return random_baseline(labels, ratio=ratio, seed=kw.get("seed", 0))
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
