"""Outputs written whole or not at all, alone or as a set.

A set (a selection's .idx, .json, plots and page; a conflicts report with its drop index) is
committed under a lock beside its files (``.face_nms.lock``, flock) with a journal
(``.face_nms.commit``) in each folder it touches: writers take turns, a reader holds the lock
while it reads, and whoever next touches a folder with a journal left by a killed commit
finishes that commit first. Names derived from an output (``<name>.tmp-<pid>``) are shortened
with a digest of the name where they would pass the filesystem's NAME_MAX.
"""
import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import signal
import stat

LOCK, JOURNAL = ".face_nms.lock", ".face_nms.commit"
TAG_ROOM = 24  # bytes a derived name adds to its stem at most: ".tmp-4194304.html"
_FINAL = {}    # temporary name -> the output it becomes, for the sets this process is writing
_NAMES = {}    # every temporary name of this process -> its output, for messages after a failure


class IncompleteSet(ValueError):
    """An output set whose commit was interrupted and that this process cannot finish."""


def name_max(folder):
    try:
        return os.pathconf(folder or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _stem(path):
    """``path``, or the same name cut and followed by a digest of it, so that ``TAG_ROOM`` more bytes fit."""
    folder, base = os.path.split(path)
    limit = name_max(folder)
    if len(base.encode()) + TAG_ROOM <= limit:
        return path
    digest = hashlib.sha256(base.encode()).hexdigest()[:16]
    head = base.encode()[:max(0, limit - TAG_ROOM - len(digest) - 1)].decode(errors="ignore")
    return os.path.join(folder, f"{head}~{digest}")


def temporary_name(path, suffix=""):
    """The name ``path`` is written under by this process (``suffix``: an extension writers look at)."""
    return f"{_stem(path)}.tmp-{os.getpid()}{suffix}"


def output_of(name):
    """The output a temporary of this process becomes; ``name`` itself for any other name."""
    return _NAMES.get(name, name)


def not_regular(path):
    """What is at ``path`` when writing it would replace something other than a regular file (a
    folder, a device node, a FIFO, a socket, a link to one of them or to nothing), else None."""
    try:
        st = os.lstat(path)
    except OSError:  # a new name (or one the folder checks refuse)
        return None
    link = stat.S_ISLNK(st.st_mode)
    if link:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"a link to nothing ({os.readlink(path)})"
        except OSError as exc:
            return f"a link that cannot be followed ({exc.strerror})"
    kind = next((what for test, what in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"),
                                         (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                                         (stat.S_ISSOCK, "socket")) if test(st.st_mode)), None)
    if kind is None and not stat.S_ISREG(st.st_mode):
        kind = "special file"
    return None if kind is None else ("a link to a " if link else "a ") + kind


def remove_stale_temporaries(path):
    """Removes temporaries of ``path`` left by a process that no longer runs (a killed run)."""
    for tmp in glob.glob(glob.escape(_stem(path)) + ".tmp-*"):
        _remove_if_dead(tmp, tmp[len(_stem(path)) + 5:])


def _remove_if_dead(tmp, tail):
    pid = tail.split(".")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    except PermissionError:
        pass


@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """A temporary name beside ``path`` to write to: renamed to ``path`` when the block succeeds,
    removed when it fails, so ``path`` only ever holds a complete file. ``suffix`` keeps the
    extension that writers such as ``np.save`` or ``savefig`` look at. A temporary of a set this
    process is writing (:func:`output_set`) is written as it is: the set renames it."""
    if path in _FINAL:
        yield path
        return
    remove_stale_temporaries(path)
    tmp = temporary_name(path, suffix)
    _NAMES[tmp] = path
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (a few renames). Python runs signal handlers
    in the main thread whichever thread the signal reaches, so a handler that only records the
    signal holds it for the whole process (blocking it in one thread's mask would not: torch's
    and tqdm's threads would take it)."""
    pending = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no handlers to install
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)  # now, to the handler the caller had


# ---- the lock beside a set ----

def _open_lock(path):
    """A descriptor of the lock file ``path`` (created where this process may); None where it
    neither exists nor can be made (a folder this process cannot write, so no writer of its)."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                continue
            if exc.errno == errno.ELOOP:
                raise OSError(f"{path} is a link, not the lock file of the outputs beside it; remove it") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path} is not a regular file, so it cannot lock the outputs beside it; remove it")
        return fd
    return None


def _acquire(folder, exclusive):
    path = os.path.join(folder, LOCK)
    while True:
        fd = _open_lock(path)
        if fd is None:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:  # else the holder before removed it on its way out: lock the file there now
            return fd, path
        os.close(fd)


def _release(fd, path):
    """Unlocks; the last holder removes the file, so that no lock outlives the runs."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.stat(path), os.fstat(fd)):
            os.remove(path)
    except OSError:
        pass  # held by another process (it removes the file), or a folder this process cannot write
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folders, exclusive=True):
    """The locks of ``folders``, taken in one order so that two writers never wait for each other."""
    held = []
    try:
        for folder in sorted(set(folders)):
            held.append(_acquire(folder, exclusive))
        yield
    finally:
        for item in reversed(held):
            if item is not None:
                _release(*item)


# ---- the journal of a commit ----

def _journal(folder):
    return os.path.join(folder, JOURNAL)


def _journal_text(folder):
    try:
        with open(_journal(folder)) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_journal(folder):
    """(temporary or "" for a removal, final) pairs of the commit recorded in ``folder``, or None.
    Only pairs a commit writes are accepted: a final name with its own temporary beside it."""
    text = _journal_text(folder)
    if text is None:
        return None
    pairs = []
    for line in text.splitlines():
        parts = line.split("\t")
        ok = len(parts) == 2 and os.path.isabs(parts[1]) and (not parts[0] or (
            os.path.dirname(parts[0]) == os.path.dirname(parts[1])
            and os.path.basename(parts[0]).startswith(os.path.basename(_stem(parts[1])) + ".tmp-")))
        if not ok:
            raise IncompleteSet(f"{_journal(folder)} is not a commit journal of face_nms outputs (line {line[:80]!r}); "
                                f"remove it")
        pairs.append((parts[0], parts[1]))
    return pairs


def _finish(folder):
    """Completes the commit recorded in ``folder`` (its locks held): the renames and removals it
    lists, then its journals in every folder it touches. A commit is complete once its journal is
    in each of those folders (all are written before the first rename): one missing while
    temporaries remain is a commit that stopped before it was made, and the old set stays."""
    for tmp in glob.glob(glob.escape(_journal(folder)) + ".tmp-*"):
        _remove_if_dead(tmp, tmp[len(_journal(folder)) + 5:])
    pairs = _read_journal(folder)
    if pairs is None:
        return
    text = _journal_text(folder)
    folders = sorted({os.path.dirname(final) for _, final in pairs} | {folder})
    if all(_journal_text(f) == text for f in folders):
        for tmp, final in pairs:
            if tmp:
                if os.path.lexists(tmp):
                    os.replace(tmp, final)
            elif os.path.isfile(final) and not os.path.islink(final):
                os.remove(final)
    for other in folders:
        if _journal_text(other) == text:
            os.remove(_journal(other))


def _folders_of(paths):
    folders = {os.path.dirname(p) for p in paths}
    for folder in list(folders):
        folders |= {os.path.dirname(final) for _, final in _read_journal(folder) or ()}
    return folders


@contextlib.contextmanager
def _finished_and_locked(paths):
    """The locks of the folders of ``paths`` with every interrupted commit there finished."""
    while True:
        folders = _folders_of(paths)
        with _locked(folders):
            if _folders_of(paths) <= folders:  # no commit into further folders was left meanwhile
                for folder in sorted(folders):
                    _finish(folder)
                yield
                return


def finish_interrupted_set(path):
    """Completes an interrupted commit of an output set beside ``path`` (see :func:`output_set`)."""
    with _finished_and_locked([os.path.realpath(path)]):
        pass


@contextlib.contextmanager
def reading_set(path):
    """Holds off writers of the set beside ``path`` while the block reads it, after finishing an
    interrupted commit there; a commit this process cannot finish is refused (IncompleteSet)."""
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    while True:
        if os.path.lexists(_journal(folder)):
            try:
                finish_interrupted_set(real)
            except OSError as exc:
                raise IncompleteSet(
                    f"{path}: the writing of its output set was interrupted ({_journal(folder)} remains) and "
                    f"cannot be finished here ({exc.strerror or exc}); run the command that wrote {path} again, "
                    f"or any face_nms command as a user who may write {folder}") from None
        with _locked([folder], exclusive=False):
            if not os.path.lexists(_journal(folder)):
                yield
                return


@contextlib.contextmanager
def output_set(paths, suffixes=None, remove=()):
    """Temporary names for several outputs that must appear together (a selection's .idx, .json
    and plots): all are written first, then renamed in one short step recorded in a journal. An
    interruption leaves either the old set or the new one: before the journal nothing was
    renamed, after it the next run (or reader) finishes the renames. ``remove``: files of that
    name left by an earlier set (a summary, plots, a page) that this one has none of; they go in
    the same step. A link to a regular file is written through: its target is replaced."""
    suffixes = suffixes or [""] * len(paths)
    for p in list(paths) + list(remove):
        what = not_regular(p)
        if what:
            raise OSError(f"{p} is {what}, not a regular file; choose another output")
    reals = [os.path.realpath(p) for p in paths]
    gone = [os.path.realpath(p) for p in remove if os.path.lexists(p)]
    with _finished_and_locked(reals + gone):
        for r in reals:
            remove_stale_temporaries(r)
    tmps = [temporary_name(r, s) for r, s in zip(reals, suffixes)]
    _FINAL.update(zip(tmps, paths))
    _NAMES.update(zip(tmps, paths))
    committed = False
    try:
        yield tmps
        for t in tmps:  # what the journal will call complete is on the disk
            fd = os.open(t, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        text = "".join(f"{t}\t{r}\n" for t, r in zip(tmps, reals)) + "".join(f"\t{r}\n" for r in gone)
        with _signals_held(), _finished_and_locked(reals + gone):
            folders = sorted({os.path.dirname(r) for r in reals + gone})
            for folder in folders:
                tmp = f"{_journal(folder)}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, _journal(folder))
                committed = True
            _finish(folders[0])
    finally:
        for t in tmps:
            _FINAL.pop(t, None)
            if not committed and os.path.exists(t):
                os.remove(t)
        # once a journal exists its temporaries are the new set: a failed rename leaves them for
        # the next run to finish


def index_family(idx):
    """The files that belong to a filtered index ``<stem>.idx``: the index, its summary, plots and page.
    A command writing the index replaces them all; those it has none of go with the old set."""
    stem = os.path.splitext(idx)[0]
    return [idx, f"{stem}.json", f"{stem}_retention.png", f"{stem}_nn_cosine.png", f"{stem}.html"]


def left_of_family(idx, written):
    """Members of ``idx``'s family that a set writing ``written`` has none of (removed with the old set)."""
    return [p for p in index_family(idx)[1:] if p not in written]


def same_file(a, b):
    """Whether writing ``a`` could replace ``b``: the same path once resolved, or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
