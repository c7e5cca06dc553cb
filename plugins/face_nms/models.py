"""The proxy models that compute features: an arcface_torch checkpoint on the host's backbones, or an ONNX model."""
import hashlib
import os
import sys

import numpy as np
import torch

from .provenance import file_sha256


class Ready:
    """Result of a synchronous model call, with the interface of :class:`_InFlight`."""

    def __init__(self, features):
        self.features = features

    def result(self):
        return self.features


class _InFlight:
    """Features being copied to pinned host memory; ``result`` waits for that copy only."""

    def __init__(self, host, event):
        self.host, self.event = host, event

    def result(self):
        self.event.synchronize()
        return self.host.numpy()


class TorchModel:
    """An arcface_torch backbone (or any module mapping Bx3x112x112 in [-1, 1] to features).

    On a GPU it runs in fp16 autocast with channels-last weights, and ``launch`` returns before
    the batch is computed, so the caller can fetch the next batch meanwhile.
    """

    def __init__(self, module, device, fp16=True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.module = module.to(self.device).eval()
        if self.cuda:
            self.module = self.module.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.amp = fp16 and self.cuda
        self.name = type(module).__name__
        self.origin = None  # set by load_checkpoint_model: the file the weights came from
        self._pinned, self._turn = [None, None], 0

    def provenance(self):
        """The checkpoint file's digest, network and embedding size, or the digest of the weights."""
        if self.origin is not None:
            return dict(self.origin)
        h = hashlib.sha256()
        for name, t in sorted(self.module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"module": self.name, "weights_sha256": h.hexdigest()}

    @torch.no_grad()
    def launch(self, images, flip):
        # NHWC uint8 permuted to NCHW is already channels-last in memory: no copy
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.div_(255).sub_(0.5).div_(0.5)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            feat = self.module(x).float()
            if flip:
                feat = feat + self.module(torch.flip(x, dims=[3])).float()
        feat = torch.nn.functional.normalize(feat, dim=1).half()
        if not self.cuda:
            return Ready(feat.numpy())
        # two pinned buffers: batch k is copied into one while the caller reads batch k-1 from the other
        self._turn ^= 1
        host = self._pinned[self._turn]
        if host is None or host.shape != feat.shape:
            host = self._pinned[self._turn] = torch.empty(feat.shape, dtype=feat.dtype, pin_memory=True)
        host.copy_(feat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _InFlight(host, event)

    def __call__(self, images, flip):
        return np.array(self.launch(images, flip).result(), np.float32)


class OnnxModel:
    """An ONNX recognition model run by insightface's model_zoo (onnxruntime)."""

    def __init__(self, path, device):
        from insightface.model_zoo import model_zoo
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model {path} not found")
        digest = file_sha256(path, "ONNX model")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if str(device).startswith("cuda") \
            else ["CPUExecutionProvider"]
        try:
            self.model = model_zoo.get_model(path, providers=providers)
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
            raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({first_line(exc)}); "
                             f"pass an insightface recognition model (.onnx)") from None
        if self.model is None or not hasattr(self.model, "get_feat"):
            raise ValueError(f"{path} is not a recognition model insightface's model_zoo can load; pass an "
                             f"insightface recognition model (.onnx)")
        self.name = os.path.basename(path)
        self.origin = model_origin(onnx=path, digest=digest)

    def provenance(self):
        return dict(self.origin)

    def __call__(self, images, flip):
        bgr = images.numpy()[:, :, :, ::-1]
        feat = self.model.get_feat(list(bgr))
        if flip:
            feat = feat + self.model.get_feat(list(bgr[:, :, ::-1]))
        feat = np.asarray(feat, np.float32)
        return feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12)


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _examples(names, k=3):
    names = sorted(names)
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def load_checkpoint_model(network, checkpoint, device, embedding_size=512, fp16=True):
    """The host's ``backbones.get_model(network)`` with the weights of an arcface_torch ``model.pt``."""
    try:
        from backbones import get_model
    except ImportError:
        raise ValueError("loading an arcface_torch checkpoint needs the host's backbones package: run from "
                         "recognition/arcface_torch or set INSIGHTFACE_DIR") from None
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    if not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding size must be a positive integer, got {embedding_size!r}")
    digest = file_sha256(checkpoint, "checkpoint")
    try:
        state = torch.load(checkpoint, map_location="cpu")
    except Exception as exc:  # pickle, zip and torch errors alike mean "not a checkpoint"
        raise ValueError(f"{checkpoint} is not a PyTorch checkpoint torch.load can read ({first_line(exc)}); "
                         f"pass the model.pt arcface_torch saved") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint} holds a {type(state).__name__}, not a state_dict of backbone weights; "
                         f"pass the model.pt arcface_torch saved")
    try:
        module = get_model(network, dropout=0.0, fp16=False, num_features=embedding_size)
    except ValueError:
        module = None
    if module is None:
        raise ValueError(f"--network {network!r} is not a network of the host's backbones.get_model "
                         f"(r18, r34, r50, r100, r200, r2060, mbf, mbf_large, vit_t, vit_s, vit_b, vit_h, ...); "
                         f"pass the network the checkpoint was trained with")
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(shape)[:2]]
        parts = [f"{len(missing)} of the network's {len(own)} tensors missing ({_examples(missing)})"
                 if missing else "", f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
                 f"{len(shape)} of another shape ({', '.join(shapes)}{', ...' if len(shape) > 2 else ''})"
                 if shape else ""]
        raise ValueError(f"{checkpoint} does not hold weights of network {network!r} with embedding size "
                         f"{embedding_size}: {'; '.join(p for p in parts if p)}; pass the --network and "
                         f"--embedding-size it was trained with")
    module.load_state_dict(state)
    model = TorchModel(module, device, fp16)
    model.name = f"{network}:{os.path.abspath(checkpoint)}"
    model.origin = model_origin(checkpoint, network, embedding_size, digest=digest)
    return model


def model_origin(checkpoint=None, network=None, embedding_size=512, onnx=None, digest=None):
    """The provenance recorded for a model file (meta.json: provenance.model): the file's sha256,
    with the network and embedding size of a checkpoint."""
    if onnx:
        return {"onnx_sha256": digest or file_sha256(onnx, "ONNX model")}
    return {"checkpoint_sha256": digest or file_sha256(checkpoint, "checkpoint"), "network": network,
            "embedding_size": int(embedding_size)}


def load_model(checkpoint, network, embedding_size, onnx, device, fp16=True):
    """The ONNX model, or the checkpoint on the host's backbones (found through INSIGHTFACE_DIR when set)."""
    if onnx:
        return OnnxModel(onnx, device)
    insightface = os.environ.get("INSIGHTFACE_DIR")
    if insightface:
        sys.path.insert(0, os.path.join(insightface, "recognition", "arcface_torch"))
    return load_checkpoint_model(network, checkpoint, device, embedding_size, fp16)
