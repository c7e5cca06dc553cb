"""Runs plugins/compat.py's steps around the first ``import mxnet`` of any program in this environment.

``mxnet_compat_hook.pth`` (in site-packages) calls ``install()`` at interpreter start-up; that imports
nothing but this module (no numpy): the finder only acts when ``mxnet`` itself is imported. Then
``compat.before_import()`` (numpy aliases, distutils) runs before mxnet's own code and
``compat.after_import(mxnet)`` (RecordIO packing with ``tobytes``) after it. ``compat`` is a copy of
plugins/compat.py made when this package is built.
"""
import sys


class _Loader:
    """mxnet's own loader, with compat's steps around its ``exec_module``."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        from . import compat
        compat.before_import()
        self._loader.exec_module(module)
        compat.after_import(module)


class MxnetFinder:
    """A meta-path finder that answers for ``mxnet`` only, with the spec the other finders give."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "mxnet" or self._busy:
            return None
        import importlib.util
        self._busy = True  # the other finders are asked through importlib, which asks this one too
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install():
    """Puts the finder first on ``sys.meta_path`` (once)."""
    if not any(type(f).__name__ == "MxnetFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, MxnetFinder())
