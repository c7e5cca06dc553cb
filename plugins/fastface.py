"""FastFace learning-rate scheduler (Gong et al., 2024).

The loss decrease ``L_{t-1} - L_t`` is smoothed by a double exponential moving
average; when the smoothed decrease ``D_EMA`` stays below the threshold lambda
for more than ``T = int(total_steps * tau)`` consecutive steps, the learning rate
is divided by delta at once. Each step costs O(1) time and memory: the double EMA
is evaluated with the authors' second-order recurrence

    D_t = w1 * D_{t-1} - w2 * D_{t-2} + w3 * (L_{t-1} - L_t)

with w1 = 2 - alpha - beta, w2 = (1 - alpha)(1 - beta), w3 = alpha * beta.

Start of the detector. The authors start the recurrence from D = alpha * (L_1 - L_2),
1/beta times what the recurrence gives from a zero state: that first difference fades as
alpha * t * (1 - alpha)^t and outweighs a real loss decrease for about 10/alpha steps,
so with a patience T shorter than that a loss that rose at the first step decays the LR
at step T + 2. ``reference_start=True`` keeps that start. The default fits a straight line
(least squares) to the first K = ceil(2 / min(alpha, beta)) losses and starts the
recurrence as if the loss had always followed it: both EMA states hold the line's
decrease per step (the recurrence's fixed point for a linear loss) and the previous loss
is the line's value at step K; stagnation is not counted during those K steps. Why a
line: any start from one loss value lets that value's noise reach D_EMA with a weight
of up to alpha/e (from a zero state; 1/e from the reference start), more than lambda for
a loss with noise 0.3, while the fitted slope's noise is sigma * sqrt(12 / K^3)
(1.2e-5 for sigma = 0.3 and K = 2000) and a fitted level's ~2 sigma / sqrt(K). A zero
state with a warm-up of 1/alpha or 2/alpha steps still decayed early in 20 to 50% of
noise draws on a loss falling at 2 lambda per step; the fitted start in none.
"""
import math
import numbers
import sys
import warnings

import numpy as np
import torch
from torch import distributed
from torch.optim.lr_scheduler import ChainedScheduler, LRScheduler, SequentialLR

from .registry import register_scheduler


# Reference start: the term alpha * (L_1 - L_2) outweighs a real loss decrease of ~1e-3 per
# step for about 10/alpha steps; a patience T shorter than that lets it decide the first decay.
WARMUP_SPAN = 10.0
# Default start: the first FIT_SPAN / min(alpha, beta) losses are fitted by a line.
FIT_SPAN = 2.0
# the hyper-parameters a saved state must share with the scheduler that loads it
# alpha, beta below it: a warm-up of 2/alpha and a memory of 1/alpha steps outlast any run (and 2/alpha
# overflows a float for the smallest positive numbers)
MIN_RATE = 1e-8
HYPER_PARAMETERS = ("total_steps", "alpha", "beta", "threshold", "tolerance", "decay", "max_decays",
                    "reference_start")


def _shown(value):
    """repr of a value, an integer too long to print given by its length."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return f"an integer of {len(str(abs(int(value))))} digits"
    return repr(value)


def _finite(value):
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond a float's range
        return False


def _real(name, value, meaning):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
        raise ValueError(f"FastFace: {name} {meaning}, got {_shown(value)}")
    return float(value)


def _whole(name, value, meaning, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) \
            or value != int(value) or value < low:
        raise ValueError(f"FastFace: {name} {meaning}, got {_shown(value)}")
    return int(value)


def _combinator(depth):
    """The name of the torch scheduler combinator that made the call ``depth`` frames up, or None."""
    owner = sys._getframe(depth + 1).f_locals.get("self")
    return type(owner).__name__ if isinstance(owner, (SequentialLR, ChainedScheduler)) else None


def _refuse_combinator(name):
    raise TypeError(f"FastFace cannot run inside torch's {name}: {name} calls step() without the loss, and FastFace "
                    f"decides from the loss; use FastFace as the only scheduler (config.lr_scheduler = \"fastface\") "
                    f"and call step(loss) after each optimizer step")


def _loss_value(loss):
    """The loss as a float, or TypeError naming what was given."""
    what = repr(loss) if not isinstance(loss, str) or len(loss) <= 40 else repr(loss[:40] + "...")
    if isinstance(loss, torch.Tensor):
        what = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
        if loss.numel() == 1 and not loss.is_complex() and loss.dtype != torch.bool:
            return float(loss.item())
    elif isinstance(loss, np.ndarray):
        what = f"a {loss.dtype} array of shape {loss.shape}"
        if loss.size == 1 and loss.dtype.kind in "fiu":
            return float(loss.item())
    elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        try:
            return float(loss)
        except OverflowError:
            raise ValueError(f"FastFace.step(loss): the loss, {_shown(loss)}, does not fit a float; pass the "
                             f"float loss.item() gives") from None
    raise TypeError(f"FastFace.step(loss): the loss must be a real number (the float loss.item() gives), "
                    f"got {what}")


class FastFace(LRScheduler):
    """Plateau-triggered step decay driven by the training loss.

    Args:
        optimizer: the wrapped optimizer; every param group is scaled alike.
        total_steps: number of training steps of the run (``cfg.total_step``), >= 1.
        alpha: alpha, rate of the first EMA, in (0, 1).
        beta: beta, rate of the second EMA, in (0, 1).
        threshold: lambda >= 0, a smoothed loss decrease below it counts as stagnation.
        tolerance: tau in (0, 1], stagnation steps allowed before a decay, as a fraction of
            ``total_steps``.
        decay: delta > 1, the learning rate is divided by it at each decay.
        max_decays: decays after this many are ignored (the LR stops falling, ``decays``
            stops counting).
        reduce_loss: average the loss over the ranks of an initialised process
            group before the detector sees it, so that every rank takes the same
            decisions even when its local losses differ. ``None`` (default) does
            so whenever the process group has more than one rank. The reduction
            runs on a CPU (gloo) group on a Python float: it adds no GPU
            synchronisation.
        reference_start: start the recurrence as the authors do, from
            D = alpha * (L_1 - L_2) (the LR sequence is then the reference's, step for
            step); ``False`` (default): the fitted start of the module docstring.

    ``step(loss)`` takes the loss of the step just taken (a float, as read by
    ``loss.item()``, or a one-element tensor). A non-finite loss (fp16 overflow, NaN)
    applies the pending decision and is otherwise ignored.
    """

    takes_loss = True

    def __init__(self, optimizer, total_steps, alpha=1e-3, beta=1e-3, threshold=5e-5,
                 tolerance=0.05, decay=2.0, max_decays=8, reduce_loss=None, reference_start=False,
                 last_epoch=-1):
        self.total_steps = _whole("total_steps", total_steps, "must be a whole number of steps >= 1 "
                                  "(cfg.total_step)", 1)
        self.alpha = _real("alpha", alpha, "is an EMA rate, a number in (0, 1)")
        self.beta = _real("beta", beta, "is an EMA rate, a number in (0, 1)")
        for name, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"FastFace: {name} is an EMA rate, a number in (0, 1), got {value!r}")
            if value < MIN_RATE:
                raise ValueError(f"FastFace: {name} {value!r} is below {MIN_RATE:g}: the detector would need "
                                 f"{FIT_SPAN:g}/{name} steps to start and remember 1/{name} steps, more than any "
                                 f"run; use a rate in [{MIN_RATE:g}, 1), e.g. the default 1e-3")
        self.threshold = _real("threshold", threshold, "(lambda) must be a finite number >= 0")
        if self.threshold < 0:
            raise ValueError(f"FastFace: threshold (lambda) must be a finite number >= 0, got {threshold!r}")
        self.tolerance = _real("tolerance", tolerance, "(tau) is a fraction of total_steps in (0, 1]")
        if not 0.0 < self.tolerance <= 1.0:
            raise ValueError(f"FastFace: tolerance (tau) is a fraction of total_steps in (0, 1], got {tolerance!r}")
        self.decay = _real("decay", decay, "(delta) divides the LR: a finite number > 1")
        if not self.decay > 1.0:
            raise ValueError(f"FastFace: decay (delta) divides the LR: a finite number > 1, got {decay!r}")
        self.max_decays = _whole("max_decays", max_decays, "must be a whole number >= 0", 0)
        if reduce_loss not in (None, True, False):
            raise ValueError(f"FastFace: reduce_loss must be None, True or False, got {reduce_loss!r}")
        if reference_start not in (True, False):
            raise ValueError(f"FastFace: reference_start must be True or False, got {reference_start!r}")
        self.reference_start = bool(reference_start)
        self.patience = int(self.total_steps * self.tolerance)
        rate = min(self.alpha, self.beta)
        self.warmup = 0 if self.reference_start else math.ceil(FIT_SPAN / rate)
        if self.reference_start and self.patience * rate < WARMUP_SPAN:
            warnings.warn(
                f"FastFace: the tolerance T = {self.patience} steps is short against the detector's warm-up "
                f"(about {WARMUP_SPAN:g}/alpha = {WARMUP_SPAN / rate:.0f} steps): "
                f"until then D_EMA follows the first loss difference, and if the loss rose at the first step "
                f"the LR decays T+2 steps into the run. Give a run of this length a larger tolerance, or larger "
                f"alpha and beta, or leave reference_start False.", stacklevel=2)
        if 2 * self.warmup > self.total_steps:
            warnings.warn(
                f"FastFace: the detector's warm-up ({FIT_SPAN:g}/min(alpha, beta) = {self.warmup} steps) is more "
                f"than half the run ({self.total_steps} steps): no decay can happen before step "
                f"{self.warmup + self.patience + 2}. Give a run this short larger alpha and beta.", stacklevel=2)
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
        # default start: first loss, sums of y_j = L_j - L_1 and of j * y_j over the warm-up
        self.fit_origin = 0.0
        self.fit_y = 0.0
        self.fit_jy = 0.0
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

    def _initial_step(self):
        wrapper = _combinator(1)
        if wrapper:
            _refuse_combinator(wrapper)
        super()._initial_step()

    def _update_lr(self, epoch=None):
        # only a combinator calls it (FastFace's own step sets the LR): SequentialLR at a milestone
        _refuse_combinator(_combinator(1) or "a scheduler combinator")

    def get_lr(self):
        """The current LRs: FastFace changes them in ``step(loss)`` only."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self, loss=None):
        wrapper = _combinator(1)  # SequentialLR (torch < 2.7: step(0) at a milestone) or ChainedScheduler
        if wrapper:
            _refuse_combinator(wrapper)
        if loss is None and (self._step_count == 0 or getattr(self, "_is_initial", False)):
            # the constructor's initial step: the LR is left untouched
            self._step_count = 1
            self.last_epoch += 1
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            return
        loss = self._reduce(_loss_value(loss))
        self._step_count += 1
        self.last_epoch += 1
        if self.pending != 1.0:
            for group in self.optimizer.param_groups:
                group["lr"] = group["lr"] * self.pending
        self.pending = 1.0
        if math.isfinite(loss):
            saved = self._detector_state()
            self._detect(loss)
            if not all(map(math.isfinite, (self.loss_prev, self.d1, self.d2, self.fit_y, self.fit_jy))):
                # a finite loss whose difference to the last overflows: ignored, as a non-finite one
                self.__dict__.update(saved)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _detector_state(self):
        return {k: getattr(self, k) for k in ("seen", "loss_prev", "d1", "d2", "count", "decays", "pending",
                                              "fit_origin", "fit_y", "fit_jy")}

    def _detect(self, loss):
        self.seen += 1
        if self.seen <= self.warmup:
            self._fit(loss)
            return
        if self.seen == 1:
            self.loss_prev = loss
            return
        if self.seen == 2 and self.reference_start:
            d = self.alpha * (self.loss_prev - loss)
        else:
            d = self.w1 * self.d1 - self.w2 * self.d2 + self.w3 * (self.loss_prev - loss)
        if d < self.threshold:
            if self.count < self.patience:
                self.count += 1
            else:
                self.count = 0
                if self.decays < self.max_decays:
                    self.pending = 1.0 / self.decay
                    self.decays += 1
        else:
            self.count = 0
        self.d2 = self.d1
        self.d1 = d
        self.loss_prev = loss

    def _fit(self, loss):
        """Warm-up of the default start: the least-squares line through the losses seen so far
        gives D_EMA (its decrease per step, in both EMA states) and the previous loss (its value now)."""
        n = self.seen
        if n == 1:
            self.fit_origin = loss
        y = loss - self.fit_origin
        self.fit_y += y
        self.fit_jy += n * y
        mean_j, mean_y = (n + 1) / 2, self.fit_y / n
        slope = 0.0 if n == 1 else (self.fit_jy - n * mean_j * mean_y) / (n * (n * n - 1) / 12)
        self.d1 = self.d2 = -slope
        self.loss_prev = self.fit_origin + mean_y + slope * (n - mean_j)

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_group")}

    def load_state_dict(self, state_dict):
        """Resumes from ``state_dict()``; refuses a state made with other hyper-parameters.
        ``reduce_loss`` is this process's own choice and is kept."""
        needed = HYPER_PARAMETERS[:-1] + ("seen", "loss_prev", "d1", "d2", "count", "decays", "pending")
        if not isinstance(state_dict, dict) or any(k not in state_dict for k in needed):
            missing = "missing " + ", ".join(k for k in needed if k not in state_dict) \
                if isinstance(state_dict, dict) else f"a {type(state_dict).__name__}"
            raise ValueError(f"FastFace: the scheduler state to load is not a FastFace state ({missing}); "
                             f"resume from a checkpoint written with FastFace, or start the run afresh")
        saved = dict(state_dict)
        saved.setdefault("reference_start", True)  # states saved before the fitted start existed
        differ = [k for k in HYPER_PARAMETERS if saved[k] != getattr(self, k)]
        if differ:
            raise ValueError(
                "FastFace: the saved scheduler state was made with "
                + ", ".join(f"{k}={saved[k]!r}" for k in differ) + " but this scheduler has "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in differ)
                + "; build FastFace with the saved values to resume that run, or start it afresh")
        self.__dict__.update({k: v for k, v in saved.items() if k not in ("_group", "reduce_loss")})

    def log_scalars(self):
        """Detector values for TensorBoard: D_EMA, the stagnation count and decays."""
        return {"fastface/d_ema": self.d1, "fastface/threshold": self.threshold,
                "fastface/stagnation": self.count, "fastface/decays": self.decays}


@register_scheduler("fastface")
def build_fastface(cfg, optimizer):
    """``config.lr_scheduler = "fastface"``; keyword arguments from ``config.fastface``."""
    return FastFace(optimizer, total_steps=cfg.total_step, **dict(cfg.get("fastface", None) or {}))
