"""Replays a loss curve through FastFace with both starts (default: the fitted start; reference: the
authors' D = alpha * (L_1 - L_2)) and plots loss, D_EMA against lambda, and the LR (as the paper's
Figures 2-3). Uses the FastFace authors' public logs from $FASTFACE_LOGS or ../shared/data/fastface_logs/
(step, 10-step mean loss, LR) when present, else a synthetic curve. Logged losses are 10-step means
every 10 steps; they are linearly interpolated to every step before the replay."""
import argparse
import glob
import os
import warnings

import numpy as np
import torch

from common import ROOT, RESULTS, save, save_figure, table
from plugins.fastface import FastFace

DEFAULT_LOGS = os.environ.get("FASTFACE_LOGS") or os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                               "fastface_logs")


def read_log(path):
    with open(path) as f:
        head = f.readline()
    total = int(head.split("total_step=")[1].split()[0].rstrip(";,"))
    data = np.genfromtxt(path, delimiter=",", skip_header=2)
    return total, data[:, 0].astype(int), data[:, 1], data[:, 2]


def synthetic(total=200_000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(10, total + 1, 10)
    loss = 30 * np.exp(-t / (total / 8)) + 8 * np.exp(-t / (total / 2)) + 3 + 0.3 * rng.standard_normal(len(t))
    return total, t, loss, np.full(len(t), np.nan)


def replay(total, steps, loss, **kwargs):
    per_step = np.interp(np.arange(1, steps[-1] + 1), steps, loss)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference start's short-tolerance warning (WebFace4M)
        sched = FastFace(opt, total_steps=total, **kwargs)
    d, lr = np.empty(len(per_step)), np.empty(len(per_step))
    for i, value in enumerate(per_step):
        sched.step(float(value))
        d[i], lr[i] = sched.d_ema, sched.get_last_lr()[0]
    return per_step, d, lr, sched


def plot(name, total, steps, loss, per_step, d, lr, ref_d, ref_lr, logged_lr, threshold, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(1, len(per_step) + 1)
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, loss, lw=0.5, color="C0")
    axes[0].set_ylabel("loss (10-step mean)")
    axes[0].set_title(f"FastFace replay: {name} (total_step {total})")
    axes[1].plot(x, ref_d, lw=0.8, color="C4", ls="--", label="D_EMA, reference start")
    axes[1].plot(x, d, lw=0.8, color="C1", label="D_EMA, default start")
    axes[1].axhline(threshold, color="C3", ls="--", label=f"lambda = {threshold:g}")
    axes[1].set_yscale("symlog", linthresh=threshold / 10)
    axes[1].set_ylabel("D_EMA")
    axes[1].legend(fontsize="small", loc="lower right")
    axes[2].plot(x, ref_lr, color="C4", ls="--", label="FastFace, reference start (replayed)")
    axes[2].plot(x, lr, color="C2", label="FastFace, default start (replayed)")
    if np.isfinite(logged_lr).any():
        axes[2].plot(steps, logged_lr, color="gray", ls="--", label="authors' logged LR")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("LR")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize="small")
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--logs", default=DEFAULT_LOGS, help="folder of CSV logs (default $FASTFACE_LOGS or ../shared/data/fastface_logs)")
    p.add_argument("--threshold", type=float, default=5e-5, help="lambda")
    p.add_argument("--tolerance", type=float, default=0.05, help="tau")
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=1e-3)
    args = p.parse_args()
    paths = sorted(glob.glob(os.path.join(args.logs, "*.csv")))
    runs = [(os.path.splitext(os.path.basename(q))[0], read_log(q)) for q in paths] or [("synthetic", synthetic())]
    if not paths:
        print(f"no logs in {args.logs}: replaying a synthetic curve")
    rows, out = [], {}
    params = dict(threshold=args.threshold, tolerance=args.tolerance, alpha=args.alpha, beta=args.beta)
    for name, (total, steps, loss, logged_lr) in runs:
        per_step, d, lr, _ = replay(total, steps, loss, **params)
        _, ref_d, ref_lr, _ = replay(total, steps, loss, reference_start=True, **params)
        decay_steps = (np.flatnonzero(np.diff(lr) < 0) + 2).tolist()
        ref_steps = (np.flatnonzero(np.diff(ref_lr) < 0) + 2).tolist()
        shift = max((abs(a - b) for a, b in zip(decay_steps, ref_steps)), default=0) \
            if len(decay_steps) == len(ref_steps) else None
        logged_changes = (steps[1:][np.diff(logged_lr) != 0]).tolist() if np.isfinite(logged_lr).any() else []
        png = os.path.join(RESULTS, f"fastface_replay_{name}.png")
        os.makedirs(RESULTS, exist_ok=True)
        plot(name, total, steps, loss, per_step, d, lr, ref_d, ref_lr, logged_lr, args.threshold, png)
        epoch = total / 5
        rows.append([name, total, len(decay_steps), " ".join(f"{s / epoch:.2f}" for s in decay_steps[:8]),
                     len(ref_steps), " ".join(f"{s / epoch:.2f}" for s in ref_steps[:8]),
                     "-" if shift is None else f"{shift} ({shift / total:.2%})",
                     " ".join(f"{s / epoch:.2f}" for s in logged_changes[:8]), lr[-1]])
        out[name] = {"total_step": total, "decay_steps": decay_steps, "reference_start_decay_steps": ref_steps,
                     "largest_shift_steps": shift, "authors_lr_change_steps": logged_changes,
                     "final_lr": float(lr[-1]), "reference_start_final_lr": float(ref_lr[-1]),
                     "plot": os.path.relpath(png, ROOT)}
    text = table(["log", "total_step", "decays", "decay at epoch (default start)", "decays (reference)",
                  "decay at epoch (reference start)", "largest shift, steps (of run)",
                  "LR change at epoch (authors)", "final LR"], rows)
    save("fastface_replay", {"params": vars(args), "runs": out, "table": text})

if __name__ == "__main__":
    main()
