"""Per-identity ranking and greedy NMS of Face-NMS, batched over identities of one size.

A batch is ``B`` identities of exactly ``m`` faces each (B x m x d features, no padding). Faces
are ranked by their cosine to the identity center (global sparsity), then greedy NMS in rank
order keeps a face iff no kept face ranked before it has a cosine above the threshold (local
sparsity). Up to 64 thresholds are decided at once: bit ``l`` of a face's mask says whether
it is kept at ``thresholds[l]``.
"""
import numpy as np
import torch

ORDERS = ("hard-first", "easy-first", "random")
TIE_SCALE = float(1 << 20)
MAX_THRESHOLDS = 64
# FULL[c]: bits 0..c-1 set, as int64 (bit 63 is the sign bit)
_FULL = np.array([(1 << c) - 1 for c in range(MAX_THRESHOLDS + 1)], np.uint64).view(np.int64)


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


def float32_floor(t):
    """The largest float32 <= t: for a float32 cosine s, ``s > t`` iff ``s > float32_floor(t)``."""
    f = np.float32(t)
    return float(f if f <= t else np.nextafter(f, np.float32(-np.inf)))


class Ranker:
    """Ranks the faces of a batch of identities and gives their pairwise cosines in rank order.

    Args:
        order: "hard-first" (ascending cosine to the center), "easy-first" or "random"; ties by row.
        centers: optional num_classes x d identity centers instead of the normalised mean feature.
        seed: seed of the "random" order.
        device: torch device of the products.
    """

    def __init__(self, order="hard-first", centers=None, seed=0, device=None):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order, self.seed = order, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.centers = None if centers is None else torch.from_numpy(np.asarray(centers, np.float32))

    def rank(self, X, rows, labels, pairwise=True):
        """(ranked pairwise cosines B x m x m float32 or None, ranked rows B x m) of B x m x d features."""
        Xt, perm, ranked_rows = self.prepare(X, rows, labels)
        if not pairwise:
            return None, ranked_rows
        return ranked_cosines(Xt, perm), ranked_rows

    def ranked_features(self, X, rows, labels):
        """(ranked float32 features B x m x d, normalised in float64, ranked rows B x m): what
        :func:`.blocked_nms.greedy_blocks` takes instead of the m x m cosines."""
        Xt, perm, ranked_rows = self.prepare(X, rows, labels)
        return torch.gather(Xt, 1, perm[..., None].expand(-1, -1, Xt.shape[2])), ranked_rows

    def prepare(self, X, rows, labels):
        """(float32 features normalised in float64 B x m x d, rank permutation B x m, ranked rows B x m)."""
        # ranking in float64: faces tied in exact arithmetic (both faces of a two-face identity
        # are equally far from their mean) get scores equal to ~1e-16, which the 2^-20 grid
        # makes exactly equal, so they rank by row index on every device and library
        X64 = torch.from_numpy(np.ascontiguousarray(X)).to(self.device).to(torch.float64)
        norm = torch.linalg.vector_norm(X64, dim=2, keepdim=True)
        good = torch.isfinite(norm[..., 0]) & (norm[..., 0] > 0)  # finite iff every value of the row is
        if not bool(good.all()):
            row = int(np.asarray(rows)[(~good).cpu().numpy()][0])
            raise ValueError(f"features contain a non-finite or all-zero row (row {row}); extract them again")
        X64.div_(norm.clamp_min_(1e-12))
        if self.centers is None:
            c = X64.sum(dim=1)
        else:
            c = self.centers[torch.from_numpy(np.asarray(labels, np.int64))].to(self.device, torch.float64)
        c = torch.nn.functional.normalize(c, dim=1)
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(self.device)
        if self.order == "random":
            key = torch.from_numpy(random_keys(rows, self.seed)).to(self.device)
        else:
            key = torch.round(torch.bmm(X64, c[:, :, None])[..., 0] * TIE_SCALE)
            if self.order == "easy-first":
                key = -key
        # rows within an identity are increasing, so a stable sort breaks ties by row index
        perm = torch.sort(key, dim=1, stable=True).indices
        return X64.float(), perm, torch.gather(rows_t, 1, perm)


def ranked_cosines(Xt, perm):
    """Pairwise cosines (B x m x m float32) of features Xt, rows and columns in rank order ``perm``."""
    # cosines first, then rows and columns permuted: m x m per identity is cheaper to move
    # than the m x d features
    S = torch.bmm(Xt, Xt.transpose(1, 2)).clamp_(-1.0, 1.0)
    m = S.shape[1]
    return torch.gather(torch.gather(S, 1, perm[..., None].expand(-1, -1, m)), 2, perm[:, None, :].expand(-1, m, -1))


def over_masks(S, thresholds):
    """int64 masks (B x m x m): bit l of [b, j, i] set iff S[b, j, i] > thresholds[l] (sorted ascending)."""
    ts = np.asarray(thresholds, np.float64)
    k = len(ts)
    if not 1 <= k <= MAX_THRESHOLDS or np.any(np.diff(ts) <= 0):
        raise ValueError(f"need 1 to {MAX_THRESHOLDS} increasing thresholds, got {k}")
    floors = torch.tensor([float32_floor(t) for t in ts], dtype=torch.float32, device=S.device)
    if k == 1:
        return (S > floors[0]).to(torch.int64)
    # how many thresholds lie strictly below each cosine: exactly the bits to set
    if S.device.type != "cpu":
        below = torch.searchsorted(floors, S.contiguous())
        return torch.from_numpy(_FULL).to(S.device)[below]
    return _bucket_masks(S, floors)


_BUCKETS = 1 << 16
_TABLES = {}


def _bucket(v):
    """Bucket of float32 cosines v in [-1, 1] (numpy): non-decreasing in v, the same for every array."""
    b = ((v + np.float32(1.0)) * np.float32(_BUCKETS / 2)).astype(np.int32)
    return np.minimum(np.maximum(b, 0, out=b), _BUCKETS, out=b)


def _bucket_masks(S, floors):
    # numpy, one thread: on a shared CPU torch's threads for element-wise work stall each other
    return torch.from_numpy(exceeded(S.numpy(), floors.numpy()))


def exceeded(x, floors):
    """int64 masks of the float32 ``floors`` (ascending) below each float32 cosine of the numpy
    array ``x``, by table look-up: a bucket holding no floor has the same floors below all its
    cosines (the bucket is monotone in the cosine); the cosines of a bucket holding a floor are
    counted by binary search. Several times faster than a binary search per cosine."""
    key = floors.tobytes()
    if key not in _TABLES:
        if len(_TABLES) > 8:
            _TABLES.clear()
        fb = _bucket(floors)
        ambiguous = np.zeros(_BUCKETS + 1, bool)
        ambiguous[fb] = True
        _TABLES[key] = (_FULL[np.searchsorted(fb, np.arange(_BUCKETS + 1))], ambiguous)
    masks, ambiguous = _TABLES[key]
    b = _bucket(x)
    out = masks[b]
    near = np.flatnonzero(ambiguous[b])
    if len(near):
        out.flat[near] = _FULL[np.searchsorted(floors, x.flat[near])]
    return out


def greedy_nms(over, k, suppressed=None):
    """Kept masks (B x m, int64, bit l for threshold l) of greedy NMS in rank order.

    ``over``: B x m x m masks from :func:`over_masks`; ``suppressed``: optional B x m masks of
    thresholds at which faces ranked before these already suppress them. Position j is final
    once the positions before it are, so one step per rank position decides every threshold at once.
    """
    full = int(_FULL[k])
    cpu = over.device.type == "cpu"
    ov = over.numpy() if cpu else over
    B, m = ov.shape[:2]
    if suppressed is not None:
        sup = suppressed.numpy().copy() if cpu else suppressed.clone()
    else:
        sup = np.zeros((B, m), np.int64) if cpu else torch.zeros((B, m), dtype=torch.int64, device=over.device)
    for j in range(m - 1):
        alive = ~sup[:, j] & full
        sup[:, j + 1:] |= alive[:, None] & ov[:, j, j + 1:]
    keep = ~sup & full
    return torch.from_numpy(keep) if cpu else keep


def nearest_kept(S, keep):
    """Max cosine of each kept face to another kept face of its identity (-inf when alone); keep: bool B x m."""
    pair = keep[:, :, None] & keep[:, None, :]
    eye = torch.eye(S.shape[1], dtype=torch.bool, device=S.device)
    return S.masked_fill(~pair | eye, float("-inf")).max(dim=2).values


def count_bits(masks, k, chunk=1 << 20):
    """Per threshold l < k: how many of the int64 ``masks`` have bit l set."""
    counts = np.zeros(64, np.int64)
    for s in range(0, len(masks), chunk):
        part = np.ascontiguousarray(masks[s:s + chunk], np.int64).view(np.uint8).reshape(-1, 8)
        counts += np.unpackbits(part, axis=1, bitorder="little").sum(axis=0, dtype=np.int64)
    return counts[:k]
