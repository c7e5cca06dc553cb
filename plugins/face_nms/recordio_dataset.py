"""An arcface_torch RecordIO folder (train.rec + train.idx) behind the dataset interface of :mod:`.datasets`.

Keys and offsets come from one parse of train.idx; labels are read from the record headers only when
asked for. A filtered set is an MXNet ``.idx`` of some image records of the same train.rec.
"""
import numpy as np

from .recordio_index import (image_records, load_filtered_index, read_index, read_record, rec_paths, record_labels,
                             write_idx)

SUBSET_EXT = ".idx"


class RecordIODataset:
    subset_ext = SUBSET_EXT

    def __init__(self, rec_dir):
        self.path = rec_dir
        self.rec, self.idx = rec_paths(rec_dir)
        self._records = self._labels = None

    def _image_records(self):
        if self._records is None:
            self._records = image_records(self.path)
        return self._records

    @property
    def layout(self):
        return self._image_records()[0]

    @property
    def keys(self):
        return self._image_records()[1]

    @property
    def offsets(self):
        return self._image_records()[2]

    @property
    def labels(self):
        if self._labels is None:
            index = read_index(self.path)
            self._records = (index.layout, index.keys, index.offsets)
            self._labels = index.labels
        return self._labels

    @property
    def num_classes(self):
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self):
        return len(self.keys)

    def read_labels(self, rows):
        """Labels of ``rows`` read from train.rec now (not from a cached index)."""
        rows = np.asarray(rows, np.int64)
        return record_labels(self.rec, self.keys[rows], self.offsets[rows])

    def record_name(self, row):
        return str(int(self.keys[int(row)]))

    def images(self, rows=None):
        from .decode import RecordImages
        if rows is None:
            return RecordImages(self.rec, self.offsets, self.keys)
        rows = np.asarray(rows, np.int64)
        return RecordImages(self.rec, self.offsets[rows], self.keys[rows])

    def read_bytes(self, row):
        with open(self.rec, "rb") as f:
            return read_record(f, int(self.offsets[int(row)]), self.rec)

    def provenance(self):
        from .provenance import dataset_provenance
        return dataset_provenance(self.path)

    def write_subset(self, path, rows):
        rows = np.asarray(rows, np.int64)
        return write_idx(path, self.keys[rows], self.offsets[rows])

    def subset_rows(self, path):
        """Rows of the records a filtered .idx lists (in its order), checked against train.idx."""
        keys = load_filtered_index(path, self.path)
        sorter = np.argsort(self.keys, kind="stable")
        return sorter[np.searchsorted(self.keys, keys, sorter=sorter)]

    def restrict(self, host_dataset, rows, cfg=None, index_path=None):
        """The host's MXFaceDataset reading the records of ``rows`` (its ``imgidx``)."""
        if not hasattr(host_dataset, "imgidx"):
            raise TypeError(f"a filtered .idx of {self.path} restricts an MXNet RecordIO dataset (train.rec + "
                            f"train.idx); got {type(host_dataset).__name__}")
        host_dataset.imgidx = np.asarray(self.keys[np.asarray(rows, np.int64)], dtype=np.int64)
        if cfg is not None and index_path is not None:
            cfg.train_idx = index_path
        return host_dataset

    def guarded_paths(self):
        return [(self.rec, "the dataset's train.rec"), (self.idx, "the dataset's train.idx")]
