"""The host's own scheduler under the registry's default name."""
from .registry import register_scheduler


@register_scheduler("polynomial")
def build_polynomial(cfg, optimizer):
    """arcface_torch's PolynomialLRWarmup with train_v2's arguments: an unmodified config trains as upstream."""
    try:
        import lr_scheduler
    except ImportError as exc:
        raise ImportError("config.lr_scheduler = 'polynomial' uses arcface_torch's lr_scheduler.py: "
                          "run from the recognition/arcface_torch folder of an insightface checkout") from exc
    try:
        return lr_scheduler.PolynomialLRWarmup(optimizer=optimizer, warmup_iters=cfg.warmup_step,
                                               total_iters=cfg.total_step)
    except TypeError as exc:
        if "verbose" not in str(exc):
            raise
        # upstream passes `verbose`, which torch 2.7 removed; patches/lr_scheduler.py.patch drops it
        import torch
        raise RuntimeError(f"{lr_scheduler.__file__} passes `verbose`, which torch {torch.__version__} no longer "
                           f"accepts: install the plugins with ./install.sh INSIGHTFACE_DIR, which patches it") from None
