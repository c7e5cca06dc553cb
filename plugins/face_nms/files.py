"""Outputs written whole or not at all."""
import contextlib
import os


@contextlib.contextmanager
def atomic_output(path, suffix=""):
    """A temporary name beside ``path`` to write to: renamed to ``path`` when the block succeeds,
    removed when it fails, so ``path`` only ever holds a complete file. ``suffix`` keeps the
    extension that writers such as ``np.save`` or ``savefig`` look at."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
