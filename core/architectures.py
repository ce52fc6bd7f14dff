"""Classifier architectures by registry name.

Every architecture is built from `(in_channels, num_classes)` so the data decides both. Our own
architectures expose `features(x)` (penultimate activations) and `head` so that evaluation can
probe what a model still knows about a class after its output has been suppressed.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from core.errors import ArchitectureError, UisError
from core.validation import validate_arch_name


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    pad = kernel // 2 if padding is None else padding
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    """A feature extractor followed by a linear head."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.body(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet18(in_channels: int, num_classes: int) -> Classifier:
    """ResNet18 in its CIFAR form: 3x3 stem with stride 1 and no max-pool."""
    layers: list[nn.Module] = [_conv_bn(in_channels, 64)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(nn.Sequential(*layers), nn.Linear(512, num_classes))


def allcnn(in_channels: int, num_classes: int) -> Classifier:
    """All-CNN-C (Springenberg et al.) with 96/192 filters and BatchNorm after every conv."""
    body = nn.Sequential(
        _conv_bn(in_channels, 96),
        _conv_bn(96, 96),
        _conv_bn(96, 96, stride=2),
        _conv_bn(96, 192),
        _conv_bn(192, 192),
        _conv_bn(192, 192, stride=2),
        _conv_bn(192, 192),
        _conv_bn(192, 192, kernel=1),
        nn.AdaptiveAvgPool2d(1),
    )
    return Classifier(body, nn.Linear(192, num_classes))


def smallcnn(in_channels: int, num_classes: int) -> Classifier:
    """A small BatchNorm CNN that trains in seconds on 8x8 digits; for tests and the demo."""
    body = nn.Sequential(
        _conv_bn(in_channels, 16),
        _conv_bn(16, 32, stride=2),
        _conv_bn(32, 64, stride=2),
        nn.AdaptiveAvgPool2d(1),
    )
    return Classifier(body, nn.Linear(64, num_classes))


def _torchvision(name: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ArchitectureError(f"unknown torchvision classifier {name!r}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 3:
        return model
    # torchvision classifiers take RGB; a learned 1x1 conv maps other channel counts onto it.
    return nn.Sequential(nn.Conv2d(in_channels, 3, 1), model)


ARCHITECTURES: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet18": resnet18,
    "allcnn": allcnn,
    "smallcnn": smallcnn,
}

# Learning rates of the unlearning pass. The paper's (Sec. V-A, CIFAR-10) for its architectures,
# used by the `paper` preset; smallcnn's was measured on digits (0.01 does not forget within its
# 10-step epoch; 0.1 does).
PAPER_UNLEARN_LR = {"resnet18": 0.002, "allcnn": 0.03, "smallcnn": 0.1}
PAPER_DEFAULT_UNLEARN_LR = 0.01
# The default pass (350+ steps, cosine decay): chosen by `uisps bench paper --experiments tune`
# on the CIFAR-10 subset, 3 seeds (docs/results/README.md): at the paper's 0.002 ResNet18 keeps
# 67 % of the forgotten class; at 0.03 it keeps none; AllCNN needs 0.1 (0.03 keeps 1-4 %).
UNLEARN_LR = {"resnet18": 0.03, "allcnn": 0.1, "smallcnn": 0.1}
DEFAULT_UNLEARN_LR = 0.03


def feature_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feature extractor's blocks in order (the body's children that hold parameters), by
    qualified name; only this project's own architectures have a body to cut into blocks."""
    if not isinstance(model, Classifier) or not isinstance(model.body, nn.Sequential):
        raise ArchitectureError("reset_blocks needs one of this project's own architectures")
    return [(f"body.{name}", m) for name, m in model.body.named_children() if any(True for _ in m.parameters())]


def unlearning_lr(arch: str, paper: bool = False) -> float:
    """The pass's learning rate for `arch` when a config leaves `lr` unset."""
    if paper:
        return PAPER_UNLEARN_LR.get(arch, PAPER_DEFAULT_UNLEARN_LR)
    return UNLEARN_LR.get(arch, DEFAULT_UNLEARN_LR)


# One seed, several fresh models: training starts from the seed's own stream; every other fresh
# model of that seed (the relabelling teacher, the bad teacher's incompetent one, re-initialised
# blocks) draws from a stream of its own, else it would be the Original's own starting weights
# whenever both use the same seed (TrainConfig's and UnlearnConfig's defaults are both 0).
TRAINING_STREAM = None
RESET_BLOCKS_STREAM = 1
RELABEL_STREAM = 2
INCOMPETENT_TEACHER_STREAM = 3


def seeded_model(arch: str, in_channels: int, num_classes: int, seed: int, stream: int | None = TRAINING_STREAM) -> nn.Module:
    """A fresh model of `arch` drawn from `seed` (and `stream`); every global random state, CUDA's
    included, is left as it was (only the CPU generator builds a model, and it is restored)."""
    if stream is not None:
        seed = int(np.random.SeedSequence([seed % 2**64, stream]).generate_state(1)[0])
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return build_model(arch, in_channels, num_classes)


def build_model(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    validate_arch_name(arch)
    if in_channels < 1 or num_classes < 2:
        raise ArchitectureError("a classifier needs at least one input channel and two classes")
    if arch.startswith("torchvision:"):
        return _torchvision(arch.split(":", 1)[1], in_channels, num_classes)
    return ARCHITECTURES[arch](in_channels, num_classes)


@functools.lru_cache(maxsize=32)
def model_skeleton(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    """`arch` with its tensors on the meta device: their names, shapes and dtypes, no memory. What
    a client names is checked against this before anything of that size is allocated. Shared
    between callers (cached): read it, never change it."""
    try:
        # torch.device("meta") is a mode of this thread only: builds in other threads go on
        with _regnet_widths_on_cpu(arch), torch.device("meta"):
            return build_model(arch, in_channels, num_classes)
    except UisError:
        raise
    except Exception as exc:  # a constructor that refuses these channels or classes, or meta tensors
        raise ArchitectureError(f"{arch} cannot be built with {num_classes} classes: {type(exc).__name__}: {exc}") from None


# Held only while torchvision's RegNet module is patched (process-wide): one tenant registering
# huge architectures must not make every other registration and upload wait behind its builds.
_REGNET_PATCH_LOCK = threading.Lock()
# One forward at a time per shared skeleton (train-mode BatchNorm writes its statistics).
_FORWARD_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_FORWARD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _regnet_widths_on_cpu(arch: str) -> Iterator[None]:
    """torchvision's RegNets work out their stage widths with tensors and read them back
    (`.tolist()`), which meta tensors cannot do. For the build, that arithmetic (plain numbers
    either way) runs on the CPU, so a RegNet skeleton costs no more memory than any other."""
    if not arch.startswith("torchvision:regnet"):
        yield
        return
    from torchvision.models import regnet

    with _REGNET_PATCH_LOCK:
        original = regnet.BlockParams.__dict__["from_init_params"]

        def on_cpu(cls: type, *args: object, **kwargs: object) -> object:
            with torch.device("cpu"):
                return original.__func__(cls, *args, **kwargs)

        regnet.BlockParams.from_init_params = classmethod(on_cpu)  # type: ignore[assignment]
        try:
            yield
        finally:
            regnet.BlockParams.from_init_params = original  # type: ignore[assignment]


def _forward_lock(skeleton: nn.Module) -> threading.Lock:
    with _FORWARD_LOCKS_GUARD:
        return _FORWARD_LOCKS.setdefault(skeleton, threading.Lock())


def check_architecture(
    arch: str, in_channels: int, num_classes: int, max_parameters: int | None, max_bytes: int | None = None
) -> None:
    """A registered architecture must exist, have BatchNorm statistics to invert, and, with these
    channels and classes, fit the size limits (of parameters, and of an upload's bytes): every
    checkpoint of it would otherwise be refused, after the API built the model, or every deletion
    request fail in its job."""
    skeleton = model_skeleton(arch, in_channels, num_classes)
    if not inverted_batchnorm_layers(skeleton):
        raise ArchitectureError(
            f"{arch} has no BatchNorm layer with running statistics, from which UISPS synthesises the "
            "forgotten classes (data-free): it cannot unlearn this model (not supported)"
        )
    size = sum(t.numel() for t in skeleton.state_dict().values())
    if max_parameters is not None and size > max_parameters:
        raise ArchitectureError(
            f"{arch} with {in_channels} input channels and {num_classes} classes holds {size:,} parameters; "
            f"this service accepts at most {max_parameters:,} (UISPS_MAX_CHECKPOINT_PARAMETERS)"
        )
    state = skeleton.state_dict()
    # A checkpoint is its tensors' bytes plus a header that names each (safetensors: its name,
    # dtype, shape and offsets, 60 bytes or more besides the name) and the manifest.
    file_bytes = sum(t.numel() * t.element_size() + len(name) + 60 for name, t in state.items())
    if max_bytes is not None and file_bytes > max_bytes:
        raise ArchitectureError(
            f"{arch} with {in_channels} input channels and {num_classes} classes makes checkpoints of at least "
            f"{file_bytes:,} bytes, so none can be uploaded: the limit is {max_bytes:,} (UISPS_MAX_UPLOAD_BYTES)"
        )


def check_input_shape(arch: str, input_shape: list[int], num_classes: int) -> None:
    """The architecture must take inputs of this shape and answer one logit per class, in training
    mode as the unlearning pass runs it: a forward pass on the meta device (shapes only, no memory,
    no arithmetic) finds a network that cannot, such as one that pools a small image down past 1x1
    or one that answers auxiliary outputs when training (torchvision's inception_v3, googlenet), at
    registration rather than in a job."""
    skeleton = model_skeleton(arch, input_shape[0], num_classes)
    try:
        # the skeleton is shared: one forward at a time (train-mode BatchNorm writes its statistics)
        with _forward_lock(skeleton), torch.no_grad():
            out = skeleton(torch.empty(2, *input_shape, device="meta"))
    except Exception as exc:
        raise ArchitectureError(
            f"{arch} cannot take inputs of shape {list(input_shape)}: {type(exc).__name__}: {exc}"[:500]
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ArchitectureError(
            f"{arch} answers {type(out).__name__} when training, not a tensor of logits: the unlearning pass "
            "cannot train it (not supported)"
        )
    if tuple(out.shape) != (2, num_classes):
        raise ArchitectureError(f"{arch} answers shape {list(out.shape)[1:]} per input, not {num_classes} logits")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def inverted_batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics the inversion matches (eq. 2)."""
    return [m for m in batchnorm_layers(model) if m.running_mean is not None and m.running_var is not None]


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not hasattr(model, "features"):
        raise ArchitectureError("feature probing needs one of this project's own architectures")
    return model.features(x)
