"""Face-NMS (Chen et al., 2021): core-set selection for RecordIO face datasets.

Pipeline: recordio_index -> proxy_subset -> extract -> select -> filter (train).
"""
import importlib

__all__ = ["Selection", "find_identity_conflicts", "find_overlap", "select_core_set"]
_HOME = {"Selection": "select", "select_core_set": "select", "find_identity_conflicts": "conflicts",
         "find_overlap": "overlap"}


def __getattr__(name):
    # imported on first use: ``python -m plugins.face_nms`` catches Ctrl-C before torch is imported
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    try:  # a submodule, as plugins.face_nms.select was once the package was imported
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
