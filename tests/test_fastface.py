import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gloo_group
from plugins.fastface import FastFace


def reference_lrs(losses, lr0, total_steps, alpha=1e-3, beta=1e-3, threshold=5e-5, tolerance=0.05, decay=2.0,
                  max_decays=8):
    """The authors' recurrence, written out plainly (one lr value, list of lrs after each step)."""
    lam, tau, delta = threshold, tolerance, decay
    w1, w2, w3 = 2 - alpha - beta, (1 - alpha) * (1 - beta), alpha * beta
    T = int(total_steps * tau)
    lr, w = lr0, 1.0
    prev = d1 = d2 = 0.0
    count = decays = 0
    calls = 0
    out = []
    for loss in losses:
        lr = lr * w
        calls += 1
        if calls == 1:
            prev = loss
            out.append(lr)
            continue
        if calls == 2:
            d = alpha * (prev - loss)
        else:
            d = w1 * d1 - w2 * d2 + w3 * (prev - loss)
        if d < lam:
            if count < T:
                w = 1.0
                count += 1
            else:
                w = 1.0 / delta
                count = 0
                decays += 1
            if decays > max_decays:
                w = 1.0
        else:
            w = 1.0
            count = 0
        d2, d1, prev = d1, d, loss
        out.append(lr)
    return out


def plateau_losses(n, seed=0, noise=0.05, slope=1e-3, segments=4):
    """A noisy loss that falls by `slope` per step, then stalls, in alternating segments."""
    rng = np.random.default_rng(seed)
    seg = np.arange(n) * segments // n
    decrement = np.where(seg % 2 == 0, slope, 0.0)
    base = 10.0 - np.cumsum(decrement)
    return (base + noise * rng.standard_normal(n)).tolist()


# faster EMAs so that short sequences reach several plateaus
FAST = dict(alpha=1e-2, beta=5e-3, threshold=1e-4, tolerance=0.01)


def make_optimizer(lrs=(0.02,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def run(scheduler, losses):
    out = []
    for loss in losses:
        scheduler.step(loss)
        out.append(scheduler.get_last_lr())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_recurrence_on_noisy_plateaus(seed):
    n = 20000
    losses = plateau_losses(n, seed)
    kwargs = dict(alpha=2e-3, beta=1e-3, threshold=1e-4, tolerance=0.01, decay=2.0, max_decays=8)
    opt = make_optimizer()
    sched = FastFace(opt, total_steps=n, reference_start=True, **kwargs)
    got = [lr[0] for lr in run(sched, losses)]
    want = reference_lrs(losses, 0.02, n, **kwargs)
    assert got == want  # exact: same float operations in the same order
    assert sched.decays >= 2, "the test curve must trigger decays to be meaningful"
    assert min(got) < 0.02 / 3


def test_default_parameters_match_reference():
    n = 5000
    losses = plateau_losses(n, 7, noise=0.5)
    sched = FastFace(make_optimizer(), total_steps=n, reference_start=True)
    got = [lr[0] for lr in run(sched, losses)]
    assert got == reference_lrs(losses, 0.02, n)
    assert sched.decays >= 1


def test_construction_leaves_lr_unchanged_and_first_steps_do_not_decay():
    opt = make_optimizer((0.3,))
    sched = FastFace(opt, total_steps=10)
    assert opt.param_groups[0]["lr"] == 0.3
    assert sched.get_last_lr() == [0.3]
    sched.step(1.0)
    assert sched.get_last_lr() == [0.3]


def test_patience_zero_decays_on_every_stagnant_step_up_to_max_decays():
    n = 50
    losses = [1.0] * n  # no decrease at all: D = 0 < lambda on every step from the second
    opt = make_optimizer()
    sched = FastFace(opt, total_steps=n, tolerance=0.01, max_decays=3, reference_start=True)
    assert sched.patience == 0
    got = [lr[0] for lr in run(sched, losses)]
    assert got == reference_lrs(losses, 0.02, n, tolerance=0.01, max_decays=3)
    # step 2 decides, step 3 applies; three decays and no more
    assert got[:2] == [0.02, 0.02]
    assert got[2:5] == [0.01, 0.005, 0.0025]
    assert got[-1] == 0.0025


def test_tiny_total_steps():
    losses = [3.0, 3.0, 3.0, 3.0]
    sched = FastFace(make_optimizer(), total_steps=1, reference_start=True)
    got = [lr[0] for lr in run(sched, losses)]
    assert got == reference_lrs(losses, 0.02, 1)
    assert got == [0.02, 0.02, 0.01, 0.005]
    with pytest.raises(ValueError, match="total_steps"):
        FastFace(make_optimizer(), total_steps=0)


def test_every_param_group_scaled_alike():
    n = 3000
    losses = plateau_losses(n, 3)
    opt = make_optimizer((0.1, 0.1 / 3, 0.5))
    sched = FastFace(opt, total_steps=n, reference_start=True, **FAST)
    got = run(sched, losses)
    ref = reference_lrs(losses, 1.0, n, **FAST)
    assert sched.decays >= 1
    for lrs, factor in zip(got, ref):
        assert lrs == pytest.approx([0.1 * factor, 0.1 / 3 * factor, 0.5 * factor], rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == got[-1]


def test_nan_and_inf_repeat_one_value_and_do_not_freeze():
    n = 4000
    losses = plateau_losses(n, 4)
    kwargs = FAST
    clean = [lr[0] for lr in run(FastFace(make_optimizer(), total_steps=n, **kwargs), losses)]
    bad_at = [10, 1500, 1501, 2999]
    noisy = list(losses)
    for k, pos in enumerate(sorted(bad_at, reverse=True)):
        noisy.insert(pos, [math.nan, math.inf, -math.inf, math.nan][k])
    sched = FastFace(make_optimizer(), total_steps=n, **kwargs)
    got = [lr[0] for lr in run(sched, noisy)]
    assert len(got) == n + len(bad_at)
    # removing the values at the non-finite steps gives back the clean trajectory
    finite_positions = [i for i, v in enumerate(noisy) if math.isfinite(v)]
    assert [got[i] for i in finite_positions] == clean
    # the LR at a non-finite step repeats the next finite one (pending decision applied)
    for i, v in enumerate(noisy):
        if not math.isfinite(v):
            j = next(k for k in range(i + 1, len(noisy)) if math.isfinite(noisy[k]))
            assert got[i] == got[j]
    assert clean[-1] < clean[0], "decays after the NaNs must still happen"


def test_resume_from_state_dict_gives_identical_trajectory(tmp_path):
    n = 6000
    losses = plateau_losses(n, 5)
    kwargs = FAST
    model = torch.nn.Linear(4, 2)
    full_opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    full = [lr[0] for lr in run(FastFace(full_opt, total_steps=n, reference_start=True, **kwargs), losses)]

    cut = 3333
    opt = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.02, momentum=0.9)
    sched = FastFace(opt, total_steps=n, reference_start=True, **kwargs)
    first = [lr[0] for lr in run(sched, losses[:cut])]
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    assert sched.decays >= 1 and sched.seen == cut

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    opt2 = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.02, momentum=0.9)
    sched2 = FastFace(opt2, total_steps=n, reference_start=True, **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    rest = [lr[0] for lr in run(sched2, losses[cut:])]
    assert first + rest == full


def test_state_is_constant_size():
    fresh = FastFace(make_optimizer((0.1, 0.2)), total_steps=100).state_dict()
    sched = FastFace(make_optimizer((0.1, 0.2)), total_steps=100)
    run(sched, plateau_losses(5000, 1))
    state = sched.state_dict()
    assert set(state) == set(fresh)
    for key, value in state.items():
        if isinstance(value, (list, tuple, dict)):
            assert len(value) == len(fresh[key]) <= 2, key


def test_step_without_loss_is_an_error():
    sched = FastFace(make_optimizer(), total_steps=100)
    with pytest.raises(TypeError, match="loss"):
        sched.step()


def _ddp_worker(rank, world, port, n, out_dir):
    gloo_group.join(rank, world, port)
    # each rank sees its own noisy local loss, as with a loss averaged only over the local batch
    losses = plateau_losses(n, seed=100 + rank, noise=0.2)
    sched = FastFace(make_optimizer(), total_steps=n, reference_start=True, **FAST)
    lrs = [lr[0] for lr in run(sched, losses)]
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array(lrs))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_take_identical_decisions(tmp_path):
    n = 3000
    mp.spawn(_ddp_worker, args=(2, gloo_group.free_port(), n, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    assert np.array_equal(r0, r1)
    assert r0[-1] < r0[0]
    # and they follow the recurrence on the mean of the two ranks' losses
    mean = [(a + b) / 2 for a, b in zip(plateau_losses(n, 100, 0.2), plateau_losses(n, 101, 0.2))]
    ref = reference_lrs(mean, 0.02, n, **FAST)
    assert r0.tolist() == ref
    # without the reduction the two ranks' local decisions differ
    local0 = reference_lrs(plateau_losses(n, 100, 0.2), 0.02, n, **FAST)
    local1 = reference_lrs(plateau_losses(n, 101, 0.2), 0.02, n, **FAST)
    assert local0 != local1


def test_reference_start_short_tolerance_warns_and_the_first_loss_difference_decides_the_first_decay():
    # a steadily falling loss whose first step rose: the recurrence starts from
    # D = alpha * (L_1 - L_2) < 0, which outweighs the real decrease for ~10/alpha steps
    n = 20000
    losses = 10.0 - 5e-4 * np.arange(n)
    losses[1] = losses[0] + 1.0
    with pytest.warns(UserWarning, match="warm-up"):
        sched = FastFace(make_optimizer(), total_steps=n, reference_start=True)
    assert sched.patience == 1000
    lrs = np.array(run(sched, losses))[:, 0]
    # stagnant from the second call on: T more calls, the decision, then applied at the next call
    assert np.flatnonzero(lrs < 0.02)[0] == sched.patience + 2
    assert lrs[sched.patience + 2] == pytest.approx(0.01)
    # the same curve whose first step fell: no decay while the loss keeps falling
    losses[1] = losses[0] - 1.0
    with pytest.warns(UserWarning):
        sched = FastFace(make_optimizer(), total_steps=n, reference_start=True)
    assert run(sched, losses)[-1][0] == pytest.approx(0.02)


def test_paper_length_runs_do_not_warn():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastFace(make_optimizer(), total_steps=202320)  # ms1mv3, batch 128, 5 epochs


@pytest.mark.parametrize("name, value, says", [
    ("total_steps", 0, "total_steps"), ("total_steps", 2.5, "total_steps"), ("total_steps", math.nan, "total_steps"),
    ("total_steps", "1000", "total_steps"), ("total_steps", True, "total_steps"),
    ("alpha", 0.0, "alpha"), ("alpha", 1.0, "alpha"), ("alpha", -1e-3, "alpha"), ("alpha", math.nan, "alpha"),
    ("alpha", "1e-3", "alpha"), ("beta", 1.5, "beta"), ("beta", math.inf, "beta"), ("beta", None, "beta"),
    ("threshold", math.nan, "threshold"), ("threshold", math.inf, "threshold"), ("threshold", -1e-5, "threshold"),
    ("threshold", "5e-5", "threshold"),
    ("tolerance", 0.0, "tolerance"), ("tolerance", 1.5, "tolerance"), ("tolerance", math.nan, "tolerance"),
    ("decay", 1.0, "decay"), ("decay", 0.5, "decay"), ("decay", -2.0, "decay"), ("decay", math.inf, "decay"),
    ("decay", math.nan, "decay"), ("decay", "2", "decay"),
    ("max_decays", -1, "max_decays"), ("max_decays", 2.5, "max_decays"), ("max_decays", math.inf, "max_decays"),
    ("max_decays", None, "max_decays"),
    ("reduce_loss", "yes", "reduce_loss"), ("reference_start", "no", "reference_start"),
])
def test_nonsense_parameters_are_refused_with_one_line_naming_the_value(name, value, says):
    kwargs = {"total_steps": 1000, name: value}
    with pytest.raises(ValueError) as err:
        FastFace(make_optimizer(), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("FastFace: ") and says in msg and repr(value) in msg


def test_sensible_edge_parameters_are_accepted():
    with pytest.warns(UserWarning):
        FastFace(make_optimizer(), total_steps=1, alpha=0.5, beta=0.999, threshold=0.0, tolerance=1.0,
                 decay=1.0001, max_decays=0)
    FastFace(make_optimizer(), total_steps=np.int64(202320), alpha=np.float32(1e-3), max_decays=np.int64(3),
             reference_start=True, reduce_loss=False)


@pytest.mark.parametrize("loss, says", [
    ("2.5", "'2.5'"), (None, "None"), (1 + 2j, "(1+2j)"), (True, "True"),
    (torch.tensor([1.0, 2.0]), "shape (2,)"), (torch.tensor(1.0 + 1.0j), "complex"),
    (np.array([1.0, 2.0]), "shape (2,)"), (np.complex128(1.0), "(1+0j)"),
])
def test_a_loss_that_is_not_a_real_number_is_refused_by_name(loss, says):
    sched = FastFace(make_optimizer(), total_steps=100)
    sched.step(1.0)
    with pytest.raises(TypeError) as err:
        sched.step(loss)
    msg = str(err.value)
    assert "\n" not in msg and "loss" in msg and says in msg
    assert sched.seen == 1 and sched.last_epoch == 1  # the refused call changed nothing


def test_one_element_tensors_and_numpy_scalars_are_losses():
    losses = [3.0, torch.tensor(2.5), torch.tensor([2.0], dtype=torch.float16), np.float32(1.5), np.array([1.0]), 1]
    sched = FastFace(make_optimizer(), total_steps=100, reference_start=True)
    for loss in losses:
        sched.step(loss)
    assert sched.seen == len(losses) and sched.loss_prev == 1.0


def test_decays_stop_counting_at_max_decays():
    n = 50
    sched = FastFace(make_optimizer(), total_steps=n, tolerance=0.01, max_decays=3, reference_start=True)
    assert sched.patience == 0
    run(sched, [1.0] * n)
    assert sched.decays == 3
    assert sched.log_scalars()["fastface/decays"] == 3


def test_load_state_dict_refuses_other_hyper_parameters_and_names_them():
    sched = FastFace(make_optimizer(), total_steps=6000, **FAST)
    run(sched, plateau_losses(500, 1))
    state = sched.state_dict()
    other = FastFace(make_optimizer(), total_steps=6000, alpha=1e-2, beta=5e-3, threshold=2e-4, tolerance=0.02)
    before = other.state_dict()
    with pytest.raises(ValueError) as err:
        other.load_state_dict(state)
    msg = str(err.value)
    assert "\n" not in msg
    assert "threshold=0.0001" in msg and "threshold=0.0002" in msg and "tolerance=0.01" in msg
    assert "tolerance=0.02" in msg and "alpha" not in msg and "beta" not in msg
    assert other.state_dict() == before  # nothing loaded
    with pytest.raises(ValueError, match="total_steps=6000.*total_steps=7000"):
        FastFace(make_optimizer(), total_steps=7000, **FAST).load_state_dict(state)
    with pytest.raises(ValueError, match="reference_start=False.*reference_start=True"):
        FastFace(make_optimizer(), total_steps=6000, reference_start=True, **FAST).load_state_dict(state)


def test_load_state_dict_refuses_what_is_not_a_fastface_state():
    sched = FastFace(make_optimizer(), total_steps=100)
    poly = torch.optim.lr_scheduler.PolynomialLR(make_optimizer(), total_iters=10)
    with pytest.raises(ValueError, match="not a FastFace state.*alpha"):
        sched.load_state_dict(poly.state_dict())
    with pytest.raises(ValueError, match="not a FastFace state"):
        sched.load_state_dict([1, 2])


def fall_then_flat(n, slope, first_delta, seed=0, sigma=0.3):
    """A loss falling by `slope` per step for the first half of the run and flat after, with Gaussian
    noise sigma per step; L_1 - L_2 set to first_delta (negative: the loss rose at the first step)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    losses = 40.0 - slope * np.minimum(t, n // 2) + sigma * rng.standard_normal(n)
    losses[1] = losses[0] - first_delta
    return losses


def first_decay(sched, losses):
    """Index (0-based step) at which the LR first fell, or None; stops there."""
    lr0 = sched.get_last_lr()[0]
    for i, loss in enumerate(losses.tolist()):
        sched.step(loss)
        if sched.get_last_lr()[0] < lr0:
            return i
    return None


# slope 1e-4 = 2 lambda: the hardest steady fall the default lambda can tell from a plateau, and one
# whose plateau a 5,000-step run can still detect; 60/n: a fall of 30 over the first half
@pytest.mark.parametrize("first_delta", [-1.0, 1.0])
@pytest.mark.parametrize("n, slope", [(5000, 1e-4), (20000, 1e-4), (20000, 3e-3), (100000, 1e-4),
                                      (100000, 6e-4), (400000, 1.5e-4)])
def test_default_start_decays_only_once_the_loss_is_flat(n, slope, first_delta):
    losses = fall_then_flat(n, slope, first_delta)
    sched = FastFace(make_optimizer(), total_steps=n)
    step = first_decay(sched, losses)
    assert step is not None, "the flat half must be detected"
    assert n // 2 < step < n


@pytest.mark.parametrize("first_delta", [-1.0, 1.0])
def test_default_start_short_run_over_many_noise_draws(first_delta):
    n = 5000
    steps = [first_decay(FastFace(make_optimizer(), total_steps=n), fall_then_flat(n, 1e-4, first_delta, seed))
             for seed in range(20)]
    assert all(s is not None and n // 2 < s < n for s in steps), steps


def test_reference_start_keeps_the_first_difference_artefact():
    n = 20000
    losses = fall_then_flat(n, 1e-4, -1.0)
    with pytest.warns(UserWarning, match="first loss difference"):
        sched = FastFace(make_optimizer(), total_steps=n, reference_start=True)
    assert first_decay(sched, losses) == sched.patience + 2


def test_default_start_warm_up_fits_the_first_losses_and_does_not_count_stagnation():
    # alpha = beta = 0.1: a warm-up of K = 2/0.1 = 20 steps; tolerance 0.01 of 50 steps: T = 0
    kwargs = dict(alpha=0.1, beta=0.1, tolerance=0.01, max_decays=2)
    sched = FastFace(make_optimizer(), total_steps=50, **kwargs)
    assert sched.warmup == 20 and sched.patience == 0
    line = [5.0 - 0.25 * j for j in range(20)]
    run(sched, line)
    assert sched.get_last_lr() == [0.02] and sched.count == 0
    assert sched.d_ema == pytest.approx(0.25, rel=1e-12)  # the line's decrease per step
    assert sched.loss_prev == pytest.approx(line[-1], rel=1e-12)
    # the same count on a flat loss: stagnant from the first step after the warm-up, not before
    got = [lr[0] for lr in run(FastFace(make_optimizer(), total_steps=50, **kwargs), [1.0] * 30)]
    assert got[:21] == [0.02] * 21 and got[21:24] == [0.01, 0.005, 0.005]


def test_default_start_does_not_warn_where_the_reference_does():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastFace(make_optimizer(), total_steps=20000)
    with pytest.warns(UserWarning, match="warm-up"):
        FastFace(make_optimizer(), total_steps=20000, reference_start=True)
    with pytest.warns(UserWarning, match="half the run"):
        FastFace(make_optimizer(), total_steps=3000)  # warm-up 2/alpha = 2000 steps


@pytest.mark.parametrize("cut", [150, 3333])  # inside the warm-up (K = 400) and after it
def test_default_start_resumes_exactly(tmp_path, cut):
    n = 6000
    losses = plateau_losses(n, 5)
    full_sched = FastFace(make_optimizer(), total_steps=n, **FAST)
    full = [lr[0] for lr in run(full_sched, losses)]
    assert full_sched.decays >= 1
    opt = make_optimizer()
    sched = FastFace(opt, total_steps=n, **FAST)
    first = [lr[0] for lr in run(sched, losses[:cut])]
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    opt2 = make_optimizer()
    sched2 = FastFace(opt2, total_steps=n, **FAST)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert first + [lr[0] for lr in run(sched2, losses[cut:])] == full


# the FastFace authors' public training logs: $FASTFACE_LOGS, else ../shared/data/fastface_logs beside the repository
LOGS = os.environ.get("FASTFACE_LOGS") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "fastface_logs")


@pytest.mark.parametrize("name", ["ms1mv3_r100_bs128_lr0.02", "webface4m_r100_bs128_lr0.02"])
def test_authors_logs_decay_where_the_reference_start_does(name):
    path = os.path.join(LOGS, name + ".csv")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent (set FASTFACE_LOGS to the folder of the FastFace authors' logs)")
    with open(path) as f:
        total = int(f.readline().split("total_step=")[1].split()[0].rstrip(";,"))
    data = np.genfromtxt(path, delimiter=",", skip_header=2)
    losses = np.interp(np.arange(1, int(data[-1, 0]) + 1), data[:, 0], data[:, 1]).tolist()
    decays = {}
    for reference_start in (True, False):
        lrs = np.array(run(FastFace(make_optimizer(), total_steps=total, reference_start=reference_start),
                           losses))[:, 0]
        decays[reference_start] = np.flatnonzero(np.diff(lrs) < 0)
    assert len(decays[True]) >= 5
    assert len(decays[False]) == len(decays[True])
    assert np.abs(decays[False] - decays[True]).max() <= 0.01 * total


# ---- inside torch's scheduler combinators, and values that overflow ----

def test_sequential_lr_and_chained_scheduler_are_refused_by_name():
    from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, SequentialLR
    opt = make_optimizer()
    with pytest.raises(TypeError) as err:  # FastFace first: its initial step comes from SequentialLR
        SequentialLR(opt, [FastFace(opt, total_steps=100), ConstantLR(opt)], milestones=[5])
    assert_refused_inside(str(err.value), "SequentialLR")
    opt = make_optimizer()
    seq = SequentialLR(opt, [ConstantLR(opt, factor=0.5, total_iters=2), FastFace(opt, total_steps=100)],
                       milestones=[3])
    seq.step()
    seq.step()
    with pytest.raises(TypeError) as err:  # the milestone hands over to FastFace, with no loss
        seq.step()
    assert_refused_inside(str(err.value), "SequentialLR")
    opt = make_optimizer()
    chained = ChainedScheduler([FastFace(opt, total_steps=100), ConstantLR(opt)])
    with pytest.raises(TypeError) as err:
        chained.step()
    assert_refused_inside(str(err.value), "ChainedScheduler")


def assert_refused_inside(msg, wrapper):
    assert "\n" not in msg and msg.startswith(f"FastFace cannot run inside torch's {wrapper}"), msg
    assert "without the loss" in msg and "step(loss)" in msg, msg


def test_rates_below_the_floor_are_refused_naming_the_value():
    for name in ("alpha", "beta"):
        with pytest.raises(ValueError) as err:
            FastFace(make_optimizer(), total_steps=1000, **{name: 5e-324})
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"FastFace: {name} 5e-324 is below 1e-08"), msg
    FastFace(make_optimizer(), total_steps=10 ** 9, alpha=1e-8, beta=1e-8, reference_start=True)


@pytest.mark.parametrize("name", ["total_steps", "max_decays", "threshold", "decay", "alpha", "tolerance"])
def test_parameters_too_large_for_a_float_are_refused_in_one_line(name):
    with pytest.raises(ValueError) as err:
        FastFace(make_optimizer(), **{"total_steps": 1000, name: 10 ** 400})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("FastFace: ") and name in msg and "an integer of 401 digits" in msg, msg


def test_a_loss_too_large_for_a_float_is_refused_and_an_overflowing_difference_ignored():
    sched = FastFace(make_optimizer(), total_steps=100, reference_start=True)
    sched.step(1.0)
    with pytest.raises(ValueError) as err:
        sched.step(10 ** 400)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("FastFace.step(loss): the loss, an integer of 401 digits, does not fit a "
                                              "float"), msg
    assert sched.seen == 1 and sched.last_epoch == 1
    for fitted in (False, True):
        sched = FastFace(make_optimizer(), total_steps=100, reference_start=not fitted, alpha=0.5, beta=0.5)
        for loss in (1.0, 1e308, -1e308, 0.9, 0.8):  # 1e308 - (-1e308) overflows: that loss is ignored
            sched.step(loss)
        state = (sched.d1, sched.d2, sched.loss_prev, sched.fit_y, sched.fit_jy)
        assert all(math.isfinite(v) for v in state), (fitted, state)
        assert sched.get_last_lr() == [0.02]
