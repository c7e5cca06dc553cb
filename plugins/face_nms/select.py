"""Face-NMS core-set selection (Chen et al., 2021).

Per identity, faces are ranked by their contribution to global sparsity (cosine to the
identity center, hard faces first), then suppressed NMS-style: a face is dropped when its
cosine with an already kept face of the same identity exceeds the threshold (local sparsity).

The features are streamed identity by identity (:mod:`.feature_stream`: one sequential pass,
also when the file is larger than memory), identities of one size batched into one array
(:mod:`.nms`). With a wanted ratio, a random sample of identities is read first and its
pairwise cosines kept; the threshold is located on them (:mod:`.threshold_search`), and the
pass goes on deciding a grid of 64 thresholds around it at once, so that the exact kept
fraction of every grid threshold is known at the end of the same pass.
"""
import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .feature_stream import FeatureReader, IdentityPlan
from .blocked_nms import MIN_ROWS, greedy_blocks, nearest_blocks
from .nms import MAX_THRESHOLDS, Ranker, count_bits, greedy_nms, nearest_kept, over_masks
from .proxy_subset import check_ratio, per_identity_quota, random_subset
from .threshold_search import RATIO_TOLERANCE, bracket, closest, crossing, refine

METHODS = ("nms", "random", "global", "local")
SAMPLE_MARGIN = 0.02  # kept-fraction half-width of the grid around the sample's estimate


@dataclass
class Selection:
    """Result of a selection: ``keep`` holds the sorted kept row indices."""
    keep: np.ndarray
    threshold: float = None
    method: str = "nms"
    order: str = "hard-first"
    total: int = 0
    nn_cos: np.ndarray = None  # max cosine of a kept face to another kept face of its identity
    nn_rows: np.ndarray = None  # the kept rows nn_cos is given for (those of the identity sample)
    search: list = field(default_factory=list)  # (threshold, kept fraction) evaluated on all faces
    passes: int = 1  # streamed passes over the features
    source: str = "memory"  # how the rows were read: memory, spill or passes
    file_reads: int = 0  # sequential reads of the whole feature file (several per pass for "passes")
    warnings: list = field(default_factory=list)  # one line each: a request the selection could not follow
    pair_peak: int = 0  # most cosines held at once (at most the pair budget, whatever the identity sizes)

    @property
    def kept(self):
        return len(self.keep)

    @property
    def fraction(self):
        return self.kept / self.total if self.total else 0.0


def _check_inputs(features, labels, centers):
    if features.ndim != 2 or features.shape[1] == 0:
        raise ValueError(f"features must be an N x d array with d >= 1, got shape {features.shape}")
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
        used = np.unique(labels)
        bad = used[~np.isfinite(centers[used]).all(axis=1) | ~(np.abs(centers[used]) > 0).any(axis=1)]
        if len(bad):
            raise ValueError(f"centers row {int(bad[0])} is {'all zero' if np.isfinite(centers[bad[0]]).all() else 'not finite'}"
                             f" ({len(bad)} such rows of identities present); pass centers of the model that "
                             f"extracted the features")
    return labels, centers


def _check_threshold(threshold):
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not np.isfinite(threshold) \
            or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a finite cosine in [-1, 1], got {threshold!r}")
    return float(threshold)


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


class _Run:
    """The batches of a plan's blocks, and the kept mask of every row (bit l: kept at grid[l]).

    An identity whose m x m cosines exceed ``budget`` is decided alone, in blocks of ranked faces
    (:mod:`.blocked_nms`), from its ranked features; smaller ones are batched, B m^2 <= budget.
    """

    def __init__(self, plan, ranker, budget=1 << 22, max_rows=None):
        if max_rows is None:
            # on the CPU a batch whose float64 features stay in cache (~4 MB) is several times faster
            # than a large one; on a GPU large batches amortise the kernel launches
            max_rows = 1 << 10 if ranker.device.type == "cpu" else 1 << 14
        self.plan, self.ranker, self.budget, self.max_rows = plan, ranker, budget, max_rows
        self.masks = np.zeros(plan.total, np.int64)
        self.masks[plan.singles] = -1  # a lone face is kept at every threshold
        self.cache = []  # (ranked cosines or, for a blocked identity, ranked features; ranked rows) of the sample
        self.pair_peak = 0

    def blocked(self, m):
        return m * m > self.budget

    def batches(self, i, j, X):
        """(labels, B x m x d features, B x m rows) of identities i..j-1, whose rows X holds in plan order."""
        plan = self.plan
        sizes = plan.sizes[i:j]
        cuts = [i] + (np.flatnonzero(np.diff(sizes)) + 1 + i).tolist() + [j]
        base = plan.starts[i]
        for a, b in zip(cuts[:-1], cuts[1:]):
            m = int(plan.sizes[a])
            per = max(1, min(self.budget // (m * m), self.max_rows // m))
            for s in range(a, b, per):
                e = min(s + per, b)
                r0 = plan.starts[s]
                rows = plan.order[r0:r0 + (e - s) * m].reshape(e - s, m)
                yield plan.labels[s:e], X[r0 - base:r0 - base + (e - s) * m].reshape(e - s, m, -1), rows

    def kept_masks(self, S, grid):
        """Kept masks (B x m) of ranked cosines S (B x m x m), or of one blocked identity's ranked
        features (1 x m x d)."""
        if self.blocked(S.shape[1]):
            keep, peak = greedy_blocks(S[0], grid, self.budget)
            self.pair_peak = max(self.pair_peak, peak)
            return keep[None]
        self.pair_peak = max(self.pair_peak, S.numel())
        return greedy_nms(over_masks(S, grid), len(grid))

    def decide(self, S, rs, grid):
        self.masks[rs.cpu().numpy()] = self.kept_masks(S, grid).cpu().numpy()

    def process(self, stream, grid, cache=False, bar=None):
        for i, j, X in stream:
            for labs, Xb, rows in self.batches(i, j, X):
                if self.blocked(rows.shape[1]):
                    S, rs = self.ranker.ranked_features(Xb, rows, labs)
                else:
                    S, rs = self.ranker.rank(Xb, rows, labs)
                if cache:
                    self.cache.append((S.cpu(), rs.cpu()))
                if grid is not None:
                    self.decide(S, rs, grid)
            if bar is not None:
                bar.update(len(X))

    def decide_cached(self, grid):
        for S, rs in self.cache:
            self.decide(S.to(self.ranker.device), rs, grid)

    def fractions(self, grid):
        return count_bits(self.masks, len(grid)) / self.plan.total

    def kept_rows(self, bit):
        return np.flatnonzero((self.masks >> bit) & 1)

    def sample_fraction(self, grid):
        """Estimated kept fraction of all faces at each grid threshold, from the sample's cosines."""
        plan = self.plan
        kept = np.zeros(len(grid), np.int64)
        for S, rs in self.cache:
            kept += count_bits(self.kept_masks(S.to(self.ranker.device), grid).cpu().numpy().ravel(), len(grid))
        multi = len(plan.order)
        return (len(plan.singles) + kept * (multi / max(plan.sample_rows, 1))) / plan.total

    def nearest(self, threshold, faces=1 << 17):
        """(rows, cosine to the nearest kept face of the identity) of kept faces of the sample
        (of its first identities holding about ``faces`` faces)."""
        rows, nn = [], []
        seen = 0
        for S, rs in self.cache:
            if seen >= faces:
                break
            seen += rs.numel()
            S = S.to(self.ranker.device)
            keep = self.kept_masks(S, [threshold]).bool()
            if self.blocked(S.shape[1]):
                near, peak = nearest_blocks(S[0][keep[0]], self.budget)
                self.pair_peak = max(self.pair_peak, peak)
                near = torch.full(keep.shape, float("-inf"), device=S.device).masked_scatter_(keep, near)
            else:
                near = nearest_kept(S, keep)
            rows.append(rs[keep.cpu()].numpy())
            v = near[keep].cpu().numpy().astype(np.float32)
            v[~np.isfinite(v)] = np.nan
            nn.append(v)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, nn = np.concatenate(rows), np.concatenate(nn)
        order = np.argsort(rows)
        return rows[order], nn[order]


def selection_warnings(sel, labels, ratio=None):
    """Lines saying what a selection could not do: a ratio out of reach, nothing to suppress, nothing dropped."""
    sizes = np.bincount(np.asarray(labels, np.int64))
    n_ids, total = int((sizes > 0).sum()), sel.total
    if n_ids == total:
        return [f"every identity has one face ({n_ids} identities): NMS has nothing to suppress and every face is "
                f"kept; check that the dataset's labels are identities, not one label per face"]
    floor = n_ids / total
    if ratio is not None and abs(sel.fraction - ratio) > RATIO_TOLERANCE:
        if ratio < floor:
            least = np.ceil(floor * 1000) / 1000
            return [f"ratio {ratio:g} is out of reach: the least a selection keeps is {floor:.2%} (one face of each "
                    f"identity, {n_ids} of {total} faces), and it keeps {sel.fraction:.2%}; ask for --ratio "
                    f"{least:g} or more"]
        at = f" at threshold {sel.threshold:.4f}" if sel.threshold is not None else ""
        return [f"ratio {ratio:g} is not reached: the closest kept fraction is {sel.fraction:.2%}{at} (faces of one "
                f"cosine are kept or dropped together); take this selection or ask for another --ratio"]
    if sel.kept == total and (ratio is None or ratio < 1):
        return [f"the selection keeps every face ({total}): no two faces of an identity have a cosine above the "
                f"threshold {sel.threshold:.4f}; lower --threshold to drop near-duplicates"]
    return []


def _grid(lo, hi, k=MAX_THRESHOLDS):
    return np.unique(np.linspace(lo, hi, k))


def _bar_factory(progress):
    if not progress:
        return lambda desc, total: contextlib.nullcontext()
    from tqdm import tqdm
    return lambda desc, total: tqdm(total=total, desc=desc, unit="face", unit_scale=True, smoothing=0.1)


@_exact_matmul()
def select_core_set(features, labels, *, threshold=None, ratio=None, order="hard-first", centers=None, seed=0,
                    device=None, chunk_rows=1 << 16, search_sample=20000, source=None, spill_dir=None,
                    memory_budget=None, pair_budget=1 << 22, progress=False, log=None):
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
        seed: seed of the "random" order and of the identity sample.
        device: torch device of the matrix products (default: cuda when available).
        chunk_rows: rows read per block.
        search_sample: identities read first (at most a tenth of the multi-face identities, at least
            2,000); with ``ratio`` the threshold is located on their
            cosines, and the report's nearest-neighbour cosines come from them.
        source, spill_dir, memory_budget: how rows are read (see :class:`.feature_stream.FeatureReader`):
            a file larger than memory is regrouped through unlinked temporary files in
            ``spill_dir`` when given, else read in several sequential passes.
        pair_budget: cosines held at once (float32, each with an 8-byte mask of the thresholds it
            exceeds): identities of up to its square root faces are batched, a larger identity is
            decided in blocks of that many ranked faces against the faces kept so far, with the
            same result, in memory O(m d + pair_budget) for m faces of dimension d.
        log: callable receiving one-line notes (the reading strategy).

    Returns:
        Selection with ``.keep`` (sorted kept rows) and ``.threshold``.
    """
    if (threshold is None) == (ratio is None):
        raise ValueError("give exactly one of threshold= or ratio=")
    if ratio is not None:
        check_ratio(ratio)
    else:
        threshold = _check_threshold(threshold)
    if isinstance(pair_budget, (bool, np.bool_)) or not isinstance(pair_budget, (int, np.integer)) \
            or pair_budget < MIN_ROWS * MIN_ROWS:
        raise ValueError(f"pair_budget must be a whole number of cosines >= {MIN_ROWS * MIN_ROWS}, got {pair_budget!r}")
    if not isinstance(search_sample, (int, np.integer)) or search_sample < 0:
        raise ValueError(f"search_sample must be a number of identities >= 0, got {search_sample!r}")
    labels, centers = _check_inputs(features, labels, centers)
    ranker = Ranker(order, centers, seed, device)
    plan = IdentityPlan(labels, search_sample, seed)
    reader = FeatureReader(features, plan, block_rows=chunk_rows, source=source, spill_dir=spill_dir,
                           memory_budget=memory_budget, log=log)
    run = _Run(plan, ranker, budget=pair_budget)
    bars = _bar_factory(progress)
    blocks = plan.blocks(chunk_rows)
    n_sample_blocks = sum(1 for i, _ in blocks if i < plan.n_sample)
    rest = blocks[n_sample_blocks:]
    rest_rows = len(plan.order) - plan.sample_rows
    search, passes = [], 1
    try:
        grid = None if ratio is not None else np.array([threshold])
        with bars("select" if ratio is None else "select (sample, then a grid of thresholds)", len(plan.order)) as bar:
            stream = reader.blocks(blocks)
            run.process(itertools.islice(stream, n_sample_blocks), grid, cache=True, bar=bar)
            if grid is None:
                sampled = {}
                refine(run.sample_fraction, ratio, -1.0, 1.0, sampled, tol=RATIO_TOLERANCE / 5)
                grid = _grid(*bracket(sampled, ratio, SAMPLE_MARGIN))
            run.process(stream, grid, bar=bar)
        if ratio is not None:
            run.decide_cached(grid)
            tried = dict(zip(grid.tolist(), run.fractions(grid)))
            last = grid
            if abs(tried[closest(tried, ratio)] - ratio) > RATIO_TOLERANCE:
                # the sample misled (or the ratio is out of reach): refine on all faces
                lo, hi = crossing(tried, ratio) or ((-1.0, float(grid[0])) if tried[grid[0]] > ratio
                                                   else (float(grid[-1]), 1.0))

                def full(ts):
                    nonlocal last, passes
                    passes += 1
                    with bars("threshold search", rest_rows) as b:
                        run.process(reader.blocks(rest), ts, bar=b)
                    run.decide_cached(ts)
                    last = ts
                    return run.fractions(ts)

                refine(full, ratio, lo, hi, tried, grid=MAX_THRESHOLDS)
            threshold = closest(tried, ratio)
            search = sorted(tried.items())
            if threshold not in last.tolist():
                passes += 1
                with bars("select", rest_rows) as b:
                    run.process(reader.blocks(rest), np.array([threshold]), bar=b)
                run.decide_cached([threshold])
                last = np.array([threshold])
            keep = run.kept_rows(last.tolist().index(threshold))
        else:
            keep = run.kept_rows(0)
        nn_rows, nn = run.nearest(threshold)
    finally:
        reader.close()
    sel = Selection(keep=keep, threshold=float(threshold), method="nms" if order != "random" else "local",
                    order=order, total=len(labels), nn_cos=nn, nn_rows=nn_rows, search=search, passes=passes,
                    source=reader.source, file_reads=reader.passes_over_file, pair_peak=run.pair_peak)
    sel.warnings = selection_warnings(sel, labels, ratio)
    return sel


@_exact_matmul()
def global_only(features, labels, *, ratio, order="hard-first", centers=None, seed=0, device=None,
                chunk_rows=1 << 16, source=None, spill_dir=None, memory_budget=None, log=None):
    """Ablation: rank each identity (global sparsity), keep its top share, no NMS."""
    check_ratio(ratio)
    labels, centers = _check_inputs(features, labels, centers)
    ranker = Ranker(order, centers, seed, device)
    plan = IdentityPlan(labels)
    reader = FeatureReader(features, plan, block_rows=chunk_rows, source=source, spill_dir=spill_dir,
                           memory_budget=memory_budget, log=log)
    run = _Run(plan, ranker)
    quota = per_identity_quota(np.bincount(labels), ratio)
    keep = [plan.singles]
    try:
        for i, j, X in reader.blocks(plan.blocks(chunk_rows)):
            for labs, Xb, rows in run.batches(i, j, X):
                _, rs = ranker.rank(Xb, rows, labs, pairwise=False)
                first = np.arange(rs.shape[1])[None, :] < quota[labs][:, None]
                keep.append(rs.cpu().numpy()[first])
    finally:
        reader.close()
    sel = Selection(keep=np.sort(np.concatenate(keep)), method="global", order=order, total=len(labels),
                    source=reader.source)
    sel.warnings = selection_warnings(sel, labels, ratio)
    return sel


def random_baseline(labels, *, ratio, seed=0):
    """Ablation: a random per-identity sample of the same ratio."""
    labels = np.asarray(labels, np.int64)
    sel = Selection(keep=random_subset(labels, ratio, seed), method="random", order="random", total=len(labels))
    sel.warnings = selection_warnings(sel, labels, ratio)
    return sel


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
