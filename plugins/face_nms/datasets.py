"""One interface to a face dataset, whichever of the host's two layouts it has.

``open_dataset(path)`` chooses as arcface_torch's ``get_dataloader`` does: train.rec and train.idx
present -> a RecordIO folder (:mod:`.recordio_dataset`), else an image folder read by torchvision's
ImageFolder (:mod:`.folder_dataset`). Both give:

* ``keys``, ``labels`` (int64, one per face record, in the order the features' rows follow),
  ``num_classes``, ``len()``, ``layout``;
* ``images(rows)``: a torch Dataset of the decoded RGB uint8 112x112x3 images (:mod:`.decode`);
  ``read_bytes(row)``: a record's stored bytes; ``read_labels(rows)``: labels read from storage now;
* ``provenance()``: what identifies the records (:mod:`.provenance`);
* ``subset_ext``, ``write_subset(path, rows)``, ``subset_rows(path)``: a filtered set (a ``.idx`` of the
  same train.rec, or a ``.txt`` of relative image paths) and the rows it lists, checked to belong;
* ``restrict(host_dataset, rows, cfg, path)``: the host's dataset (MXFaceDataset or ImageFolder) reduced
  to those rows; ``guarded_paths()``: the dataset files no output may replace (a folder dataset guards
  every path inside it, see :func:`inside`).
"""
import os


def is_recordio(path):
    """Whether the host reads ``path`` as RecordIO: train.rec and train.idx both exist (get_dataloader's test)."""
    return os.path.exists(os.path.join(path, "train.rec")) and os.path.exists(os.path.join(path, "train.idx"))


def open_dataset(path, progress=True):
    """The dataset at ``path`` (a folder), as the host would read it; a dataset object is returned as it is."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    path = os.fspath(path)
    if os.path.isdir(path) and not is_recordio(path):
        from .folder_dataset import FolderDataset
        return FolderDataset(path, progress=progress)
    from .recordio_dataset import RecordIODataset
    return RecordIODataset(path)


def inside(path, dataset_path):
    """Whether writing ``path`` would put something inside the image folder ``dataset_path`` (or replace it),
    also through an identity folder that is a link to a folder elsewhere (its images are the dataset's too)."""
    real = os.path.realpath(path)
    return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)
               for folder in [os.path.realpath(dataset_path)] + _linked_identities(dataset_path))


def _linked_identities(dataset_path):
    """Real paths of the identity folders of ``dataset_path`` that are links (one scandir, no stat of others)."""
    try:
        with os.scandir(dataset_path) as it:
            links = [e.path for e in it if e.is_symlink()]
    except OSError:
        return []
    return [os.path.realpath(p) for p in links if os.path.isdir(p)]
