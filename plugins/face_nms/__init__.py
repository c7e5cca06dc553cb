"""Face-NMS (Chen et al., 2021): core-set selection for RecordIO face datasets.

Pipeline: recordio_index -> proxy_subset -> extract -> select -> filter (train).
"""
from .conflicts import find_identity_conflicts
from .overlap import find_overlap
from .select import Selection, select_core_set

__all__ = ["Selection", "find_identity_conflicts", "find_overlap", "select_core_set"]
