"""Outputs written whole or not at all, alone or as a set."""
import contextlib
import glob
import os
import signal


def _tmp_name(path, suffix=""):
    return f"{path}.tmp-{os.getpid()}{suffix}"


def remove_stale_temporaries(path):
    """Removes temporaries of ``path`` left by a process that no longer runs (a killed run)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp[len(path) + 5:].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
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
    extension that writers such as ``np.save`` or ``savefig`` look at."""
    remove_stale_temporaries(path)
    tmp = _tmp_name(path, suffix)
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


def finish_interrupted_set(first):
    """Completes the renames of an output set whose commit was interrupted (see :func:`output_set`)."""
    journal = first + ".commit"
    remove_stale_temporaries(journal)
    if not os.path.exists(journal):
        return
    with open(journal) as f:
        pairs = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for tmp, final in pairs:
        if os.path.exists(tmp):
            os.replace(tmp, final)
    os.remove(journal)


@contextlib.contextmanager
def output_set(paths, suffixes=None):
    """Temporary names for several outputs that must appear together (a selection's .idx, .json
    and plots): all are written first, then renamed in one short step recorded in a journal
    (``<first>.commit``). An interruption leaves either the old set or the new one: before the
    journal nothing was renamed, after it the next run finishes the renames."""
    suffixes = suffixes or [""] * len(paths)
    finish_interrupted_set(paths[0])
    for p in paths:
        remove_stale_temporaries(p)
    tmps = [_tmp_name(p, s) for p, s in zip(paths, suffixes)]
    committed = False
    try:
        yield tmps
        journal = paths[0] + ".commit"
        with _signals_held():
            with atomic_output(journal) as j, open(j, "w") as f:
                f.writelines(f"{t}\t{p}\n" for t, p in zip(tmps, paths))
                f.flush()
                os.fsync(f.fileno())
            committed = True
            finish_interrupted_set(paths[0])
    finally:
        if not committed:
            for t in tmps:
                if os.path.exists(t):
                    os.remove(t)
        # once the journal exists its temporaries are the new set: a failed rename leaves them for
        # the next run to finish
