"""arcface_torch plugins: the FastFace LR scheduler and the Face-NMS dataset filter.

Selected from an ordinary arcface_torch config through ``plugins.registry``.
"""
