"""The host's own scheduler under the registry's default name."""
from .registry import register_scheduler


@register_scheduler("polynomial")
def build_polynomial(cfg, optimizer):
    """arcface_torch's PolynomialLRWarmup with train_v2's arguments: an unmodified config trains as upstream."""
    try:
        from lr_scheduler import PolynomialLRWarmup
    except ImportError as exc:
        raise ImportError("config.lr_scheduler = 'polynomial' uses arcface_torch's lr_scheduler.py: "
                          "run from the recognition/arcface_torch folder of an insightface checkout") from exc
    return PolynomialLRWarmup(optimizer=optimizer, warmup_iters=cfg.warmup_step, total_iters=cfg.total_step)
