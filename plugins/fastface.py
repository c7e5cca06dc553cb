"""FastFace learning-rate scheduler (Gong et al., 2024).

The loss decrease ``L_{t-1} - L_t`` is smoothed by a double exponential moving
average; when the smoothed decrease ``D_EMA`` stays below the threshold lambda
for more than ``T = int(total_steps * tau)`` consecutive steps, the learning rate
is divided by delta at once. Each step costs O(1) time and memory: the double EMA
is evaluated with the authors' second-order recurrence

    D_t = w1 * D_{t-1} - w2 * D_{t-2} + w3 * (L_{t-1} - L_t)

with w1 = 2 - alpha - beta, w2 = (1 - alpha)(1 - beta), w3 = alpha * beta.
"""
import math
import warnings

import torch
from torch import distributed
from torch.optim.lr_scheduler import LRScheduler

from .registry import register_scheduler


# The recurrence starts from D = alpha * (first loss difference): that term fades as
# alpha * t * (1 - alpha)^t, so it outweighs a real loss decrease of ~1e-3 per step for
# about 10/alpha steps; a patience T shorter than that lets it decide the first decay.
WARMUP_SPAN = 10.0


class FastFace(LRScheduler):
    """Plateau-triggered step decay driven by the training loss.

    Args:
        optimizer: the wrapped optimizer; every param group is scaled alike.
        total_steps: number of training steps of the run (``cfg.total_step``).
        alpha: alpha, rate of the first EMA.
        beta: beta, rate of the second EMA.
        threshold: lambda, a smoothed loss decrease below it counts as stagnation.
        tolerance: tau, stagnation steps allowed before a decay, as a fraction of
            ``total_steps``.
        decay: delta, the learning rate is divided by it at each decay.
        max_decays: decays after this many are ignored (the LR stops falling).
        reduce_loss: average the loss over the ranks of an initialised process
            group before the detector sees it, so that every rank takes the same
            decisions even when its local losses differ. ``None`` (default) does
            so whenever the process group has more than one rank. The reduction
            runs on a CPU (gloo) group on a Python float: it adds no GPU
            synchronisation.

    ``step(loss)`` takes the loss of the step just taken (a float, as read by
    ``loss.item()``). A non-finite loss (fp16 overflow, NaN) applies the pending
    decision and is otherwise ignored.
    """

    takes_loss = True

    def __init__(self, optimizer, total_steps, alpha=1e-3, beta=1e-3, threshold=5e-5,
                 tolerance=0.05, decay=2.0, max_decays=8, reduce_loss=None, last_epoch=-1):
        if int(total_steps) < 1:
            raise ValueError(f"FastFace: total_steps must be a positive step count, got {total_steps!r}")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"FastFace: {name} is an EMA rate in (0, 1], got {value!r}")
        if not 0.0 <= tolerance <= 1.0:
            raise ValueError(f"FastFace: tolerance (tau) is a fraction of total_steps in [0, 1], got {tolerance!r}")
        if decay <= 0:
            raise ValueError(f"FastFace: decay (delta) must be positive, got {decay!r}")
        if int(max_decays) < 0:
            raise ValueError(f"FastFace: max_decays must be >= 0, got {max_decays!r}")
        self.total_steps = int(total_steps)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.tolerance = float(tolerance)
        self.decay = float(decay)
        self.max_decays = int(max_decays)
        self.patience = int(self.total_steps * self.tolerance)
        if self.patience * min(self.alpha, self.beta) < WARMUP_SPAN:
            warnings.warn(
                f"FastFace: the tolerance T = {self.patience} steps is short against the detector's warm-up "
                f"(about {WARMUP_SPAN:g}/alpha = {WARMUP_SPAN / min(self.alpha, self.beta):.0f} steps): "
                f"until then D_EMA follows the first loss difference, and if the loss rose at the first step "
                f"the LR decays T+2 steps into the run. Give a run of this length a larger tolerance, or larger alpha "
                f"and beta.", stacklevel=2)
        self.w1 = 2.0 - self.alpha - self.beta
        self.w2 = (1.0 - self.alpha) * (1.0 - self.beta)
        self.w3 = self.alpha * self.beta
        # detector state
        self.loss_prev = 0.0
        self.d1 = 0.0
        self.d2 = 0.0
        self.count = 0
        self.decays = 0
        self.pending = 1.0
        self.seen = 0
        self._group = None
        self.reduce_loss = reduce_loss
        super().__init__(optimizer, last_epoch)

    @property
    def d_ema(self):
        """The current detector signal D_EMA (the last smoothed loss decrease)."""
        return self.d1

    def _loss_group(self):
        if self.reduce_loss is False or not (distributed.is_available() and distributed.is_initialized()):
            return None
        if distributed.get_world_size() == 1:
            return None
        if self._group is None:
            backend = distributed.get_backend()
            self._group = distributed.group.WORLD if backend == "gloo" else distributed.new_group(backend="gloo")
        return self._group

    def _reduce(self, loss):
        group = self._loss_group()
        if group is None:
            return loss
        t = torch.tensor([loss], dtype=torch.float64)
        distributed.all_reduce(t, group=group)
        return t.item() / distributed.get_world_size(group)

    def step(self, loss=None):
        if loss is None:
            if self._step_count == 0 or getattr(self, "_is_initial", False):
                # the constructor's initial step: the LR is left untouched
                self._step_count = 1
                self.last_epoch += 1
                self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
                return
            raise TypeError("FastFace.step(loss) needs the loss of the step just taken (float)")
        loss = self._reduce(float(loss))
        self._step_count += 1
        self.last_epoch += 1
        if self.pending != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.pending
        self.pending = 1.0
        if math.isfinite(loss):
            self._detect(loss)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _detect(self, loss):
        self.seen += 1
        if self.seen == 1:
            self.loss_prev = loss
            return
        if self.seen == 2:
            d = self.alpha * (self.loss_prev - loss)
        else:
            d = self.w1 * self.d1 - self.w2 * self.d2 + self.w3 * (self.loss_prev - loss)
        if d < self.threshold:
            if self.count < self.patience:
                self.pending = 1.0
                self.count += 1
            else:
                self.pending = 1.0 / self.decay
                self.count = 0
                self.decays += 1
            if self.decays > self.max_decays:
                self.pending = 1.0
        else:
            self.pending = 1.0
            self.count = 0
        self.d2 = self.d1
        self.d1 = d
        self.loss_prev = loss

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_group")}

    def load_state_dict(self, state_dict):
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "_group"})

    def log_scalars(self):
        """Detector values for TensorBoard: D_EMA, the stagnation count and decays."""
        return {"fastface/d_ema": self.d1, "fastface/threshold": self.threshold,
                "fastface/stagnation": self.count, "fastface/decays": self.decays}


@register_scheduler("fastface")
def build_fastface(cfg, optimizer):
    """``config.lr_scheduler = "fastface"``; keyword arguments from ``config.fastface``."""
    return FastFace(optimizer, total_steps=cfg.total_step, **dict(cfg.get("fastface", None) or {}))
