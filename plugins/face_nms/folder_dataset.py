"""An image folder dataset as the host reads it when config.rec holds no train.rec + train.idx:
torchvision's ``ImageFolder``, one sub-folder per identity.

The listing follows torchvision's ``find_classes`` and ``make_dataset`` exactly: identities are the
sub-folders of the root in sorted order (labels 0..C-1), each identity's files come from
``sorted(os.walk(folder, followlinks=True))`` (folders in the order of their full path strings, names
sorted within a folder), and a file is an image when its lower-cased name ends with one of
torchvision's ``IMG_EXTENSIONS``. It is made in one pass of ``os.scandir`` that also stats every image
(size and mtime) for the dataset's provenance, with a progress bar. Where torchvision would go on
silently (an unreadable sub-folder, a link back to a folder above, a dangling link), the listing stops
with one line naming the path.

A record is a row of that listing; its key is the row number. A filtered set is a text file of the kept
images' paths relative to the root, one per line, in listing order.
"""
import hashlib
import os
import stat
import struct

import numpy as np

from .files import atomic_output

# torchvision.datasets.folder.IMG_EXTENSIONS; compared in tests with the installed torchvision
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SUBSET_EXT = ".txt"
_SIZE_MTIME = struct.Struct("<qq")


class FolderError(ValueError):
    """An image folder, image or file list that cannot be used as it is."""


def _fs(text):
    return os.fsencode(text)


class FolderDataset:
    """The images of an ImageFolder tree; ``keys`` are row numbers of the listing."""

    layout = "folder"
    subset_ext = SUBSET_EXT

    def __init__(self, root, progress=True):
        self.path = root
        self._progress = progress
        self._listing = None

    # ---- the listing (one pass) ----

    def _list(self):
        if self._listing is None:
            self._listing = list_images(self.path, self._progress)
        return self._listing

    @property
    def files(self):
        """Paths relative to the root, in listing order."""
        return self._list()[0]

    @property
    def labels(self):
        return self._list()[1]

    @property
    def classes(self):
        return self._list()[2]

    @property
    def keys(self):
        return np.arange(len(self.files), dtype=np.int64)

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.files)

    def read_labels(self, rows):
        return self.labels[np.asarray(rows, np.int64)]

    def record_name(self, row):
        return self.files[int(row)]

    # ---- images ----

    def images(self, rows=None):
        from .decode import FolderImages
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, np.int64)
        return FolderImages(self.path, [self.files[i] for i in rows.tolist()])

    def read_bytes(self, row):
        path = os.path.join(self.path, self.files[int(row)])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise FolderError(f"image {path} cannot be read ({exc.strerror}); fix its permissions or remove "
                              f"it from the folder") from None

    # ---- provenance ----

    def provenance(self):
        """The digest of the sorted file list with sizes and mtimes, and of a sample of file contents."""
        from .provenance import sampled_digest
        files, _, classes, digest = self._list()
        return {"layout": "folder", "images": len(files), "identities": len(classes),
                "file_list_sha256": digest, "content_sample_sha256": sampled_digest(self.read_bytes, len(files))}

    # ---- filtered sets ----

    def write_subset(self, path, rows):
        """Writes the kept images' relative paths, one per line in listing order, atomically."""
        rows = np.sort(np.asarray(rows, np.int64))
        files = self.files
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", errors="surrogateescape",
                                              newline="\n") as f:
            for s in range(0, len(rows), 1 << 16):
                f.write("".join(files[i] + "\n" for i in rows[s:s + (1 << 16)].tolist()))
            f.flush()
            os.fsync(f.fileno())
        return path

    def subset_rows(self, path):
        """Rows of the images a filtered set lists (in its order), each checked to be an image of this folder."""
        paths = read_file_list(path)
        if not paths:
            raise FolderError(f"filtered set {path} lists no images")
        return self.subset_rows_of(paths, f"filtered set {path}")

    def subset_rows_of(self, paths, what="the filtered set"):
        """Rows of ``paths`` (relative to the root), each an image of this listing, none twice. A list in
        listing order (as written) is matched in one merge pass, without a table of every file."""
        files, rows, j = self.files, np.empty(len(paths), np.int64), 0
        for n, name in enumerate(paths):
            while j < len(files) and files[j] != name:
                j += 1
            if j == len(files):
                return self._rows_by_table(paths, what)
            rows[n] = j
            j += 1
        return rows

    def _rows_by_table(self, paths, what):
        where = {name: i for i, name in enumerate(self.files)}
        rows = np.empty(len(paths), np.int64)
        for n, name in enumerate(paths):
            i = where.get(name)
            if i is None:
                if os.path.isabs(name) or ".." in name.split("/") or name.startswith("./"):
                    raise FolderError(f"{what}: line {n + 1} ({name!r}) is not a path relative to the image folder "
                                      f"{self.path} as face_nms writes them (e.g. 'id0/0001.jpg'); write the set "
                                      f"with a face_nms command or fix its lines")
                if "\t" in name and name.split("\t")[0].isdigit():
                    raise FolderError(f"{what} holds 'key<TAB>offset' lines: it is an MXNet index of a RecordIO "
                                      f"dataset, not a filtered set of the image folder {self.path}; give a .txt "
                                      f"written for this folder")
                raise FolderError(f"{what} does not belong to {self.path}: line {n + 1} ({name!r}) is not an image "
                                  f"of that folder; select again from features of this dataset")
            rows[n] = i
        if len(np.unique(rows)) != len(rows):
            seen = set()
            n = next(n for n, r in enumerate(rows.tolist()) if r in seen or seen.add(r))
            raise FolderError(f"{what} lists {paths[n]!r} twice (line {n + 1}); regenerate it")
        return rows

    def restrict(self, host_dataset, rows, cfg=None, index_path=None):
        """The host's ImageFolder restricted to ``rows`` of this listing (its samples checked to be this listing)."""
        _check_host_listing(host_dataset, _host_files(host_dataset, self.path), self.path, self)
        return _keep_rows(host_dataset, rows)

    def guarded_paths(self):
        """Files an output must not replace: none by name; every path inside the folder is refused instead."""
        return []


def read_file_list(path):
    """The lines of a filtered set of an image folder (relative paths)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise FolderError(f"filtered set {path} is not a file: give the .txt written by `python -m plugins.face_nms "
                          f"select`")
    if not os.path.isfile(path):
        raise FolderError(f"filtered set {path} not found: run `python -m plugins.face_nms select` first or fix "
                          f"config.face_nms['index']")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            # an image name never holds a line break (the listing refuses one), so a CRLF end is an editor's,
            # and neither does it start with a byte-order mark
            lines = [line.rstrip("\r\n") for line in f if line not in ("\n", "\r\n")]
            if lines and lines[0].startswith("\ufeff"):
                lines[0] = lines[0][1:]
            return lines
    except OSError as exc:
        raise FolderError(f"filtered set {path} cannot be read ({exc.strerror}); check the file") from None


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(root, progress=True):
    """(relative paths, labels int64, class names, sha256 of the list with sizes and mtimes) of an
    ImageFolder tree, in torchvision's order, from one scandir pass."""
    from tqdm import tqdm
    if not os.path.isdir(root):
        raise FolderError(f"--rec {root} is not a folder: give an image folder (one sub-folder per identity) or a "
                          f"RecordIO folder holding train.rec and train.idx")
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if _is_dir(e))
    except OSError as exc:
        raise FolderError(f"--rec {root} cannot be read ({exc.strerror}); check its permissions") from None
    if not classes:
        pair = [os.path.join(root, n) for n in ("train.rec", "train.idx")]
        have = [os.path.exists(p) for p in pair]
        if any(have):
            missing, there = (pair[1], pair[0]) if have[0] else (pair[0], pair[1])
            raise FolderError(f"{missing} not found beside {os.path.basename(there)}, and {root} holds no identity "
                              f"sub-folders either: restore {os.path.basename(missing)} (a RecordIO folder needs "
                              f"both) or give an image folder with one sub-folder of images per identity")
        raise FolderError(f"{root} holds no train.rec + train.idx and no identity sub-folders: give a RecordIO "
                          f"folder or an image folder with one sub-folder of images per identity")
    files, labels, h = [], [], hashlib.sha256()
    bar = tqdm(desc="listing", unit="file", unit_scale=True, mininterval=1.0, disable=None if progress else True)
    try:
        for label, name in enumerate(classes):
            top = os.path.join(root, name)
            found = []
            _walk(top, found, bar)
            found.sort(key=lambda item: item[0])
            count = 0
            for folder, images in found:
                prefix = name + folder[len(top):] + os.sep
                images.sort()
                names = [prefix + fname for fname, _, _ in images]
                files += names
                h.update(b"".join(_fs(rel) + b"\0" + _SIZE_MTIME.pack(size, mtime)
                                  for rel, (_, size, mtime) in zip(names, images)))
                count += len(images)
            if not count:
                raise FolderError(f"identity folder {top} holds no image (names ending in "
                                  f"{', '.join(IMG_EXTENSIONS)}); torchvision's ImageFolder refuses it too: add its "
                                  f"images or remove the folder")
            labels.append(np.full(count, label, np.int64))
    finally:
        bar.close()
    return files, np.concatenate(labels), classes, h.hexdigest()


def _is_dir(entry):
    try:
        return entry.is_dir()  # follows links, as find_classes and os.walk do
    except OSError:
        return False


def _inode(path):
    s = os.stat(path)
    return s.st_dev, s.st_ino


def _walk(top, found, bar):
    """os.walk(top, followlinks=True) collecting (folder, [(image name, size, mtime_ns)]); a link back to an
    ancestor, an unreadable folder and an image that cannot be stat-ed are refused. A stack, not recursion:
    a tree may be nested deeper than Python's recursion limit."""
    stack = [(top, (_inode(top),))]
    while stack:
        folder, ancestors = stack.pop()
        subdirs = _list_folder(folder, found, bar)
        for e in reversed(subdirs):
            path = os.path.join(folder, e.name)
            node = _inode(path)
            if node in ancestors:
                raise FolderError(f"{path} links back to a folder above it: the tree has a loop (os.walk with "
                                  f"followlinks=True, as torchvision lists it, would never end); remove the link")
            stack.append((path, ancestors + (node,)))


def _list_folder(folder, found, bar):
    """Appends (folder, its images) to ``found``; returns its sub-folders."""
    name = os.path.basename(folder)
    if "\n" in name or "\r" in name:
        raise FolderError(f"folder {folder!r} has a line break in its name; a filtered set lists one image path per "
                          f"line: rename it")
    images, subdirs = [], []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        raise FolderError(f"folder {folder} cannot be read ({exc.strerror}); fix its permissions (torchvision would "
                          f"skip it silently)") from None
    for e in entries:
        if _is_dir(e):
            subdirs.append(e)
            continue
        name = e.name
        if not name.lower().endswith(IMG_EXTENSIONS):
            continue
        try:
            s = e.stat()
        except OSError as exc:
            what = "is a link to nothing" if e.is_symlink() else f"cannot be read ({exc.strerror})"
            raise FolderError(f"image {os.path.join(folder, name)} {what}; fix or remove it") from None
        if not stat.S_ISREG(s.st_mode) or "\n" in name or "\r" in name:
            why = ("is not a regular file; remove it from the folder" if not stat.S_ISREG(s.st_mode) else
                   "has a line break in its name; a filtered set lists one name per line: rename it")
            raise FolderError(f"image {os.path.join(folder, name)!r} {why}")
        images.append((name, s.st_size, s.st_mtime_ns))
    found.append((folder, images))
    bar.update(len(images))
    return subdirs


def restrict_image_folder(dataset, root, kept, listing=None):
    """Restricts the host's ImageFolder (``samples``, ``targets``, ``imgs``) to the images ``kept`` (paths
    relative to ``root``). With ``listing`` (a FolderDataset of ``root``) its samples are first checked to be
    that listing with the same labels, so that the kept paths name the images the selection saw."""
    rel = _host_files(dataset, root)
    if listing is not None:
        _check_host_listing(dataset, rel, root, listing)
        return _keep_rows(dataset, listing.subset_rows_of(kept, "the filtered set"))
    where = {name: i for i, name in enumerate(rel)}
    missing = next((p for p in kept if p not in where), None)
    if missing is not None:
        raise FolderError(f"{missing!r} of the filtered set is not an image the host's ImageFolder lists in {root}; "
                          f"select again from features of this dataset")
    return _keep_rows(dataset, [where[p] for p in kept])


def _host_files(dataset, root):
    if not (hasattr(dataset, "samples") and hasattr(dataset, "targets")):
        raise TypeError(f"the filtered set of the image folder {root} restricts torchvision's ImageFolder; got "
                        f"{type(dataset).__name__}")
    prefix = os.path.join(root, "")
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p, _ in dataset.samples]


def _check_host_listing(dataset, rel, root, listing):
    if rel != listing.files or dataset.targets != listing.labels.tolist():
        n = next((i for i, (a, b) in enumerate(zip(rel, listing.files)) if a != b), min(len(rel), len(listing)))
        raise FolderError(f"the host's ImageFolder of {root} lists {len(rel)} images and this plugin "
                          f"{len(listing)}, first difference at row {n}; the folder changed while it was read "
                          f"or torchvision lists it otherwise: check the folder and rerun")


def _keep_rows(dataset, rows):
    samples = dataset.samples
    dataset.samples = [samples[i] for i in sorted(int(r) for r in rows)]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    return dataset
