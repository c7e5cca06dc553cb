"""A proxy model whose features carry nothing, found on the first batch it computes.

An untrained or wrongly loaded network (BatchNorm statistics never trained, another network's
weights in the wrong shape of layers, a detector or attribute model instead of a recognition
model) gives all-zero, non-finite or identical features for every face; extracting them would
take the whole run and leave selection and cleaning nothing to work with.
"""
import numpy as np

# unit rows within this distance of their mean are one feature (float16 rounding moves a 512-d unit
# row by ~5e-4; a random proxy network's features of different faces lie ~0.1 apart)
CONSTANT = 2e-3


def first_batch_problem(features, images):
    """What is wrong with the features of a model's first batch (unit rows), or None."""
    f = np.asarray(features, np.float32)
    bad = ~np.isfinite(f).all(axis=1)
    if bad.any():
        return f"gives non-finite features ({int(bad.sum())} of {len(f)} rows)"
    zero = ~(f != 0).any(axis=1)
    if zero.any():
        return "gives all-zero features" + ("" if zero.all() else f" ({int(zero.sum())} of {len(f)} rows)")
    if len(f) >= 2 and np.linalg.norm(f - f.mean(axis=0), axis=1).max() < CONSTANT:
        x = np.asarray(images).reshape(len(f), -1)
        if (x != x[:1]).any():  # different faces, one feature (the same photo packed again is no sign)
            return "gives identical features to different faces"
    return None


def check_first_batch(features, images, model_name, rec_path, first_row):
    """Refuses, in one line naming the model, a first batch whose features carry nothing."""
    problem = first_batch_problem(features, images)
    if problem:
        raise ValueError(f"the model {model_name} {problem} on the first {len(features)} images of {rec_path} "
                         f"(records {first_row}..{first_row + len(features) - 1}): check the model: BatchNorm "
                         f"statistics of an untrained network, the wrong --network for the checkpoint, or a model "
                         f"file of another task (not face recognition); nothing was extracted: run again with the "
                         f"right model and --overwrite")
