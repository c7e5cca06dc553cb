import pytest
import torch
from easydict import EasyDict as edict

from plugins import registry
from plugins.fastface import FastFace
from plugins.registry import (apply_dataset_filter, build_lr_scheduler, log_lr_scheduler, register_dataset_filter,
                              register_scheduler, step_lr_scheduler)


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def test_unknown_scheduler_lists_the_registered_names():
    with pytest.raises(KeyError) as err:
        build_lr_scheduler(edict(lr_scheduler="fast_face", total_step=10), optimizer())
    msg = str(err.value)
    assert "fast_face" in msg and "fastface" in msg and "polynomial" in msg


def test_unknown_filter_lists_the_registered_names():
    with pytest.raises(KeyError) as err:
        apply_dataset_filter(edict(dataset_filter="facenms"), [1, 2])
    assert "facenms" in str(err.value) and "face_nms" in str(err.value) and "random" in str(err.value)


def test_fastface_from_config_with_its_arguments():
    cfg = edict(lr_scheduler="fastface", total_step=1000, fastface=dict(threshold=1e-3, tolerance=0.1, decay=4.0))
    sched = build_lr_scheduler(cfg, optimizer())
    assert isinstance(sched, FastFace)
    assert (sched.threshold, sched.patience, sched.decay) == (1e-3, 100, 4.0)


def test_no_filter_leaves_the_dataset_and_num_image_alone():
    cfg = edict(num_image=123)
    data = [1, 2, 3]
    assert apply_dataset_filter(cfg, data) is data and cfg.num_image == 123


def test_user_registration_and_duplicate_names():
    @register_scheduler("test_constant")
    def build(cfg, opt):
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2)

    @register_dataset_filter("test_even")
    def even(cfg, dataset):
        return dataset[::2]

    try:
        opt = optimizer()
        sched = build_lr_scheduler(edict(lr_scheduler="test_constant"), opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
        step_lr_scheduler(sched, 1.0)  # not loss-driven: called without the loss
        cfg = edict(dataset_filter="test_even", num_image=10)
        assert apply_dataset_filter(cfg, list(range(10))) == [0, 2, 4, 6, 8] and cfg.num_image == 5
        with pytest.raises(KeyError, match="already registered"):
            register_scheduler("test_constant")(lambda cfg, opt: None)
    finally:
        registry.SCHEDULERS.pop("test_constant")
        registry.DATASET_FILTERS.pop("test_even")


def test_tensorboard_logging_every_frequent_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sched = FastFace(optimizer(), total_steps=100)
    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 31):
        step_lr_scheduler(sched, 5.0 - step * 0.01)
        log_lr_scheduler(writer, sched, step, 10)
    log_lr_scheduler(None, sched, 10, 10)  # ranks other than 0 have no writer
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    d = acc.Scalars("fastface/d_ema")
    assert [e.step for e in d] == [10, 20, 30]
    assert d[-1].value == pytest.approx(sched.d_ema, rel=1e-6)
    assert [e.value for e in acc.Scalars("fastface/decays")] == [0, 0, 0]
