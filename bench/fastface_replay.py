"""Replays a loss curve through FastFace and plots loss, D_EMA against lambda, and the LR (as the
paper's Figures 2-3). Uses the FastFace authors' public logs when ../shared/data/fastface_logs/
exists (step, 10-step mean loss, LR), else a synthetic curve. Logged losses are 10-step means every
10 steps; they are linearly interpolated to every step before the replay."""
import argparse
import glob
import os

import numpy as np
import torch

from common import ROOT, RESULTS, save, save_figure, table
from plugins.fastface import FastFace

DEFAULT_LOGS = os.path.join(os.path.dirname(ROOT), "shared", "data", "fastface_logs")


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
    sched = FastFace(opt, total_steps=total, **kwargs)
    d, lr = np.empty(len(per_step)), np.empty(len(per_step))
    for i, value in enumerate(per_step):
        sched.step(float(value))
        d[i], lr[i] = sched.d_ema, sched.get_last_lr()[0]
    return per_step, d, lr, sched


def plot(name, total, steps, loss, per_step, d, lr, logged_lr, threshold, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(1, len(per_step) + 1)
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, loss, lw=0.5, color="C0")
    axes[0].set_ylabel("loss (10-step mean)")
    axes[0].set_title(f"FastFace replay: {name} (total_step {total})")
    axes[1].plot(x, d, lw=0.8, color="C1", label="D_EMA")
    axes[1].axhline(threshold, color="C3", ls="--", label=f"lambda = {threshold:g}")
    axes[1].set_yscale("symlog", linthresh=threshold / 10)
    axes[1].set_ylabel("D_EMA")
    axes[1].legend()
    axes[2].plot(x, lr, color="C2", label="FastFace (replayed)")
    if np.isfinite(logged_lr).any():
        axes[2].plot(steps, logged_lr, color="gray", ls="--", label="authors' logged LR")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("LR")
    axes[2].set_xlabel("step")
    axes[2].legend()
    save_figure(fig, path)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--logs", default=DEFAULT_LOGS, help="folder of CSV logs (default ../shared/data/fastface_logs)")
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
    for name, (total, steps, loss, logged_lr) in runs:
        per_step, d, lr, sched = replay(total, steps, loss, threshold=args.threshold, tolerance=args.tolerance,
                                        alpha=args.alpha, beta=args.beta)
        decay_steps = (np.flatnonzero(np.diff(lr) < 0) + 2).tolist()
        logged_changes = (steps[1:][np.diff(logged_lr) != 0]).tolist() if np.isfinite(logged_lr).any() else []
        png = os.path.join(RESULTS, f"fastface_replay_{name}.png")
        os.makedirs(RESULTS, exist_ok=True)
        plot(name, total, steps, loss, per_step, d, lr, logged_lr, args.threshold, png)
        epoch = total / 5
        rows.append([name, total, len(decay_steps), " ".join(f"{s / epoch:.2f}" for s in decay_steps[:8]),
                     " ".join(f"{s / epoch:.2f}" for s in logged_changes[:8]), lr[-1]])
        out[name] = {"total_step": total, "decay_steps": decay_steps, "authors_lr_change_steps": logged_changes,
                     "final_lr": float(lr[-1]), "plot": os.path.relpath(png, ROOT)}
    text = table(["log", "total_step", "decays", "decay at epoch (replay)", "LR change at epoch (authors)",
                  "final LR"], rows)
    save("fastface_replay", {"params": vars(args), "runs": out, "table": text})


if __name__ == "__main__":
    main()
