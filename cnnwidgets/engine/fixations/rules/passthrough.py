"""Same-shape layers a point passes through unchanged: ReLU, LRN and dropout (authors); batch,
group, instance and layer norm, every elementwise activation and stochastic depth (extension:
the authors ignore batch norm; stochastic depth is the identity in eval mode)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ClassName, rule, rule_for


@rule(
    # modules
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Identity, nn.modules.dropout._DropoutNd, nn.LayerNorm,
    ClassName("FrozenBatchNorm2d"), ClassName("MemoryEfficientSwish"), ClassName("Swish"),
    # functions
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu,
    F.leaky_relu, F.mish, F.softplus, F.dropout, F.dropout2d, F.batch_norm, F.layer_norm,
    F.group_norm, F.local_response_norm, F.sigmoid, F.tanh, torch.relu, torch.sigmoid,
    torch.tanh, torch.relu_, torch.nn.functional.relu_, torch.clamp, torch.clip,
    # tensor methods
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "clone", "detach", "to", "float", "type_as", "hardtanh_", "cpu", "cuda",
)
def passthrough(walk, node, idx):
    """Same-shape layers: each point stays where it is."""
    src = node.args[0]
    if walk.is_flow(src) and walk.values[src].shape != walk.values[node].shape:
        raise walk.unsupported(node, "it changes the tensor's shape")
    walk.send(src, idx)


try:  # torchvision's EfficientNet / ConvNeXt blocks
    from torchvision.ops import stochastic_depth
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass
else:
    rule(stochastic_depth)(passthrough)


def passes_through(node, modules: dict) -> bool:
    """Whether ``node`` is a same-shape layer the backtrack passes points through."""
    found = rule_for(node, modules)
    return found is not None and found.fn is passthrough
