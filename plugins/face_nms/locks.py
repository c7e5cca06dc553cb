"""One writer at a time for a folder."""
import fcntl
import os


class FolderLock:
    """``flock`` on the file ``name`` in a folder, for one run; the kernel releases it if the process dies."""

    def __init__(self, out_dir, name, busy):
        self.path = os.path.join(out_dir, name)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(busy.format(folder=out_dir, lock=self.path)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder removed meanwhile
                self.fd = fd
                return
            os.close(fd)

    def release(self):
        if self.fd is not None:
            os.remove(self.path)
            os.close(self.fd)
            self.fd = None
