"""Feature rows streamed identity by identity, in sequential passes when the file exceeds memory.

The rows of an im2rec-packed dataset are shuffled: an identity's faces are scattered through
the feature file. :class:`IdentityPlan` fixes a processing order of the identities (a sample
first, then by size, so that identities of one size are adjacent and stack into one B x m x d
array without padding) and cuts it into blocks of whole identities. :class:`FeatureReader`
gives each block's rows, from one of three sources:

* ``memory``: an array in memory, indexed row by row;
* ``passes``: one sequential pass over the file per bucket (a range of blocks whose rows fit
  ``memory_budget``), gathering that bucket's rows. From the page cache a pass costs a fraction
  of a second per GB, far less than faulting in scattered rows one by one (several microseconds
  each), so this is the way for a file that memory holds;
* ``spill``: for a file larger than memory, one sequential pass appends each row to the
  temporary file of its bucket, then each bucket file is read back whole; the temporary files
  are unlinked when created, so nothing survives an interruption.

Singletons (identities of one face) are always kept and never read.
"""
import os
import shutil
import tempfile

import numpy as np

SOURCES = ("memory", "spill", "passes")


def available_memory():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 1 << 62


class IdentityPlan:
    """Identities in processing order, and their rows.

    Attributes: ``order`` (rows of the multi-face identities, grouped, in processing order),
    ``starts``/``sizes``/``labels`` per identity in that order, ``singles`` (rows of one-face
    identities), ``n_sample`` (how many identities, from the first, form the sample).
    """

    def __init__(self, labels, sample_ids=0, seed=0):
        labels = np.asarray(labels, np.int64)
        counts = np.bincount(labels)
        multi = np.flatnonzero(counts > 1)
        self.singles = np.flatnonzero(counts[labels] == 1)
        # a tenth of the identities at most (at least 2,000): beyond that the sample costs more than it tells
        n_sample = min(int(sample_ids), max(2000, len(multi) // 10), len(multi))
        in_sample = np.zeros(len(multi), bool)
        if n_sample:
            in_sample[np.random.default_rng(seed).choice(len(multi), n_sample, replace=False)] = True
        # sample first, then by size, then by label
        ids = multi[np.lexsort((multi, counts[multi], ~in_sample))]
        rank = np.full(len(counts), -1, np.int64)
        rank[ids] = np.arange(len(ids))
        row_rank = rank[labels]
        order = np.argsort(row_rank, kind="stable")
        self.order = order[len(self.singles):]  # singletons (rank -1) sort first
        self.labels = ids
        self.sizes = counts[ids]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.n_sample = n_sample
        self.total = len(labels)

    @property
    def sample_rows(self):
        return int(self.sizes[:self.n_sample].sum())

    def blocks(self, max_rows):
        """(first identity, end identity) ranges of whole identities with at most ``max_rows`` rows
        (or one identity), never spanning the end of the sample."""
        out = []
        ends = np.cumsum(self.sizes)
        i = 0
        while i < len(self.sizes):
            limit = len(self.sizes) if i >= self.n_sample else self.n_sample
            base = self.starts[i]
            j = int(np.searchsorted(ends, base + max_rows, side="right"))
            j = min(max(j, i + 1), limit)
            out.append((i, j))
            i = j
        return out


def _row_reader(features):
    """(fd, byte offset of row 0, row bytes) of a memory-mapped .npy view, or None."""
    import mmap
    mm = getattr(features, "_mmap", None)
    name = getattr(features, "filename", None)
    if not isinstance(features, np.memmap) or mm is None or name is None or not features.flags.c_contiguous:
        return None
    map_start = features.offset - features.offset % mmap.ALLOCATIONGRANULARITY
    base = np.frombuffer(mm, np.uint8).ctypes.data
    return os.open(name, os.O_RDONLY), map_start + features.ctypes.data - base, features.shape[1] * features.itemsize


class FeatureReader:
    """Rows of the blocks of an :class:`IdentityPlan`, read from ``features``.

    Args:
        source: one of SOURCES, or None to choose: ``memory`` for an array, ``passes`` for a
            memory-mapped file up to 3/4 of the available memory; for a larger one ``spill`` when
            ``spill_dir`` is given and has room, else ``passes``.
        memory_budget: bytes of rows held at once by the ``spill`` and ``passes`` sources
            (default: 1/16 of the available memory, at least 2 GB and at most 8 GB).
        log: callable receiving one line about the choice made.
    """

    def __init__(self, features, plan, *, block_rows=1 << 16, source=None, spill_dir=None,
                 memory_budget=None, log=None):
        if source is not None and source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.features, self.plan, self.block_rows = features, plan, block_rows
        self.d = features.shape[1]
        self._file = _row_reader(features)
        self.row_bytes = self.d * features.dtype.itemsize
        need = len(plan.order) * self.row_bytes
        if self._file is None:
            source = "memory"
        elif source is None:
            source = "passes" if features.nbytes <= available_memory() * 3 // 4 else "spill"
        if source == "spill":
            if spill_dir is None:
                source = "passes"
            elif not _writable(spill_dir):
                if log:
                    log(f"{spill_dir} is not a writable folder: reading the features in several sequential passes "
                        f"instead of regrouping them there")
                source = "passes"
            else:
                free = shutil.disk_usage(spill_dir).free
                if free < need * 1.05 + (1 << 30):
                    if log:
                        log(f"{spill_dir} has {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed to regroup the "
                            f"features: reading them in several sequential passes instead")
                    source = "passes"
                elif log:
                    log(f"features larger than memory: regrouping {need / 2**30:.1f} GiB through unlinked temporary "
                        f"files in {spill_dir} ({free / 2**30:.1f} GiB free)")
        self.source, self.spill_dir = source, spill_dir
        if memory_budget is None:
            memory_budget = min(max(1 << 31, available_memory() // 16), 1 << 33)
        self.bucket_rows = max(block_rows, memory_budget // max(self.row_bytes, 1))
        self.passes_over_file = 0

    def close(self):
        if self._file is not None:
            os.close(self._file[0])
            self._file = None

    def _read_rows(self, rows):
        """Rows (any order) of an array, or of a memory-mapped file through the mapping."""
        if self._file is None:
            return np.asarray(self.features[rows])
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.d), self.features.dtype)
        out[order] = self.features[rows[order]]
        _release(self.features)
        return out

    def _buckets(self, blocks):
        """Consecutive runs of blocks holding at most bucket_rows rows (at least one block)."""
        out, cur, rows = [], [], 0
        for b in blocks:
            n = int(self.plan.starts[b[1] - 1] + self.plan.sizes[b[1] - 1] - self.plan.starts[b[0]])
            if cur and rows + n > self.bucket_rows:
                out.append(cur)
                cur, rows = [], 0
            cur.append(b)
            rows += n
        if cur:
            out.append(cur)
        return out

    def _sequential(self, chunk_rows=1 << 15):
        """(first row, rows) of the whole file, in order; a file larger than memory leaves the page cache."""
        fd, off, rb = self._file
        n = len(self.features)
        buf = np.empty((chunk_rows, self.d), self.features.dtype)
        view = memoryview(buf).cast("B")
        drop = self.features.nbytes > available_memory() * 3 // 4
        for s in range(0, n, chunk_rows):
            e = min(s + chunk_rows, n)
            _pread_into(fd, view[:(e - s) * rb], off + s * rb)
            if drop:
                _drop_cache(fd, off + s * rb, (e - s) * rb)
            yield s, buf[:e - s]
        self.passes_over_file += 1

    def blocks(self, blocks):
        """(first identity, end identity, rows in plan order, in the file's dtype) for each block of ``blocks``."""
        plan = self.plan
        if self.source == "memory":
            for i, j in blocks:
                s, e = plan.starts[i], plan.starts[j - 1] + plan.sizes[j - 1]
                yield i, j, self._read_rows(plan.order[s:e])
            return
        buckets = self._buckets(blocks)
        if self.source == "passes":
            for bucket in buckets:
                yield from self._bucket_blocks(bucket, self._gather_pass(bucket))
            return
        files = self._spill(buckets)
        try:
            for bucket, f in zip(buckets, files):
                rows = np.sort(plan.order[plan.starts[bucket[0][0]]:_end(plan, bucket[-1][1])])
                data = np.empty((len(rows), self.d), self.features.dtype)
                f.seek(0)
                if f.readinto(memoryview(data).cast("B")) != data.nbytes:
                    raise OSError(f"a temporary file in {self.spill_dir} was cut short; run the selection again")
                f.close()
                yield from self._bucket_blocks(bucket, (rows, data))
        finally:
            for f in files:
                f.close()

    def _bucket_blocks(self, bucket, rows_data):
        rows, data = rows_data
        plan = self.plan
        for i, j in bucket:
            s, e = plan.starts[i], _end(plan, j)
            yield i, j, data[np.searchsorted(rows, plan.order[s:e])]

    def _gather_pass(self, bucket):
        plan = self.plan
        rows = np.sort(plan.order[plan.starts[bucket[0][0]]:_end(plan, bucket[-1][1])])
        data = np.empty((len(rows), self.d), self.features.dtype)
        for s, chunk in self._sequential():
            a, b = np.searchsorted(rows, [s, s + len(chunk)])
            data[a:b] = chunk[rows[a:b] - s]
        return rows, data

    def _spill(self, buckets):
        """One sequential pass writing each bucket's rows, in row order, to its own unlinked file."""
        plan = self.plan
        bucket_of = np.full(len(self.features), -1, np.int32)
        for k, bucket in enumerate(buckets):
            bucket_of[plan.order[plan.starts[bucket[0][0]]:_end(plan, bucket[-1][1])]] = k
        files = [tempfile.TemporaryFile(dir=self.spill_dir, prefix=".face_nms-spill-") for _ in buckets]
        try:
            for s, chunk in self._sequential():
                bk = bucket_of[s:s + len(chunk)]
                idx = np.argsort(bk, kind="stable")
                bounds = np.searchsorted(bk[idx], np.arange(len(buckets) + 1))
                for k, f in enumerate(files):
                    if bounds[k + 1] > bounds[k]:
                        f.write(chunk[idx[bounds[k]:bounds[k + 1]]].tobytes())
            for f in files:
                f.flush()
        except BaseException:
            for f in files:
                f.close()
            raise
        return files


def _writable(folder):
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _release(array):
    """Unmaps the pages of a memory-mapped array touched so far (they stay in the page cache):
    scattered reads map whole neighbourhoods of each row (fault-around), which would otherwise
    stay mapped for the whole run."""
    import mmap
    mm = getattr(array, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def _end(plan, j):
    return plan.starts[j - 1] + plan.sizes[j - 1]


def _pread_into(fd, view, offset):
    got = os.preadv(fd, [view], offset)
    while got < len(view):
        more = os.preadv(fd, [view[got:]], offset + got)
        if more == 0:
            raise ValueError(f"the feature file ends before byte {offset + len(view)}; extract the features again")
        got += more


def _drop_cache(fd, offset, length):
    """Asks the kernel to drop pages of a file larger than memory once streamed: kept, they would
    push out what the cache can still serve (the temporary files just written)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
