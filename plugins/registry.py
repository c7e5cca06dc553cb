"""Names in an arcface_torch config mapped to the code that builds them.

    config.lr_scheduler = "fastface"      # default "polynomial", the host's own
    config.dataset_filter = "face_nms"    # default None, the dataset untouched

A builder is registered with a decorator; users add their own the same way:

    @register_scheduler("my_sched")
    def build(cfg, optimizer): ...

    @register_dataset_filter("my_filter")
    def build(cfg, dataset): ...   # returns the filtered dataset
"""
import importlib

SCHEDULERS = {}
DATASET_FILTERS = {}

# modules whose import registers the built-in names
_BUILTINS = ("plugins.schedulers", "plugins.fastface", "plugins.face_nms.filter")


def _register(table, kind, name):
    def decorator(builder):
        if name in table and table[name] is not builder:
            raise KeyError(f"{kind} {name!r} is already registered by {table[name].__module__}")
        table[name] = builder
        return builder
    return decorator


def register_scheduler(name):
    """Decorator: ``builder(cfg, optimizer) -> scheduler`` selectable as ``config.lr_scheduler = name``."""
    return _register(SCHEDULERS, "lr_scheduler", name)


def register_dataset_filter(name):
    """Decorator: ``builder(cfg, dataset) -> dataset`` selectable as ``config.dataset_filter = name``."""
    return _register(DATASET_FILTERS, "dataset_filter", name)


def _load_builtins():
    for module in _BUILTINS:
        importlib.import_module(module)


def _lookup(table, key, name):
    _load_builtins()
    if name not in table:
        names = ", ".join(sorted(table))
        raise KeyError(f"config.{key} = {name!r} is not registered; registered names: {names}. "
                       f"Fix the name in the config file or register it with register_"
                       f"{'scheduler' if key == 'lr_scheduler' else 'dataset_filter'}.")
    return table[name]


def build_lr_scheduler(cfg, optimizer):
    """The scheduler named by ``cfg.lr_scheduler`` (default ``"polynomial"``)."""
    name = cfg.get("lr_scheduler", None) or "polynomial"
    return _lookup(SCHEDULERS, "lr_scheduler", name)(cfg, optimizer)


def apply_dataset_filter(cfg, dataset):
    """The dataset reduced by ``cfg.dataset_filter``; unchanged when it is unset.

    A filter sets ``cfg.num_image`` to the filtered size (so ``total_step``
    follows) and, when the kept records are listed in an index file,
    ``cfg.train_idx`` to it for the DALI reader.
    """
    name = cfg.get("dataset_filter", None)
    if not name:
        return dataset
    dataset = _lookup(DATASET_FILTERS, "dataset_filter", name)(cfg, dataset)
    cfg.num_image = len(dataset)
    return dataset


def step_lr_scheduler(scheduler, loss_value):
    """One scheduler step; a loss-driven scheduler gets the float already read for logging."""
    if getattr(scheduler, "takes_loss", False):
        scheduler.step(loss_value)
    else:
        scheduler.step()


def log_lr_scheduler(writer, scheduler, global_step, frequent):
    """Writes the scheduler's ``log_scalars()`` to TensorBoard every ``frequent`` steps."""
    if writer is None or global_step % frequent != 0 or not hasattr(scheduler, "log_scalars"):
        return
    for tag, value in scheduler.log_scalars().items():
        writer.add_scalar(tag, value, global_step)
