"""CNN Fixations (Mopuri, Garg & Babu, IEEE TIP 2019): unravel the forward pass.

No gradients, no bias terms, no tuning parameters. Starting from the class neuron, the set of
*points* (channel, row, col) that decided each layer's kept outputs is carried back, layer by
layer, down to the input pixels. This package does it for any network ``torch.fx`` can
trace, with one rule per operation instead of one loop per architecture:

1. The model is traced once (``torch.fx`` symbolic tracing with :class:`FixationTracer`, cached
   per module) into a graph of nodes (:mod:`.graph`).
2. One forward pass walks the graph with a tiny interpreter that keeps every node's value.
   No hook is registered at all; operations that write into their input (in-place ReLU,
   ``out += identity``) get a copy, so each recorded value is the one the next layer saw.
3. Nodes are visited in reverse order from the logits. Each node holds a *set* of points —
   flat indices into one sample of its output (deduplicated with ``torch.unique``) — and its
   rule sends points to the nodes it read from, where the sets of all consumers are merged
   (:mod:`.walk`; the result, :class:`Fixations`, in :mod:`.result`).

Each rule is one function, registered for its operations (module types, functions, tensor
method names) with :func:`~.registry.rule`, in a file of its family under :mod:`.rules`:
``convolution`` (convolution, linear), ``pooling``, ``passthrough`` (norms, activations,
dropout), ``shape`` (reshape, permute, indexing, split, concatenation, padding) and
``arithmetic``. Adding an operation is one function::

    @rule(nn.Hardshrink, F.hardshrink, "hardshrink")
    def hardshrink(walk, node, idx):
        walk.send(node.args[0], idx)  # same shape: each point stays where it is

A module type with a rule is kept whole by the tracer. An operation without a rule stops the
backtrack with an :class:`UnsupportedOperationError` that names it.

The authors' rules (see ``shared/ALGORITHMS.md``):

* **linear → linear**: keep every input whose contribution ``a_j W_ij`` is positive for some
  kept neuron i (union); **linear on a flattened C×H×W map**: per neuron the single argmax of
  the contribution. Only the weight rows of the kept neurons are read, in chunks (the authors'
  VGG fc6 step builds a ~411 MB product; here it is a few MB at a time).
* **convolution**: in the receptive-field window of the point, the contributions
  ``x[:, window] * W[c]`` summed over the window give one score per input channel; the new
  channel is the argmax, the new position the window centre ``S*h - P + D*((K-1)//2)``,
  clipped to the map. One point in, one point out. Only the windows at the points are read.
  Departure (``position="auto"``, the default): for *strided* convolutions the point moves to
  the window position where the chosen channel contributes most, as the authors' ResNet-101
  code does for its 3×3 convolutions — the centre rule would put every point of a network that
  downsamples by strided convolutions (EfficientNet, MobileNet) on a grid of the total stride.
  ``position="centre"`` is the paper's rule everywhere.
* **max pooling**: the point moves to the argmax of its window (via ``return_indices``, so
  padding, dilation and ``ceil_mode`` are exactly those of the forward pass).
* **global average pooling**: the pooled vector is 1-D for the linear rule that follows; each
  kept channel then goes to the argmax location of its map.
* **residual addition**: the point follows the larger of the two summands at that point.
* **concatenation**: the channel index selects the branch.
* **ReLU, LRN, dropout**: passed through.

Extensions the authors did not cover, made here (each also noted at its rule):

* **batch norm** (and group/instance norm, frozen BN): passed through, as the authors ignore it.
* **any elementwise activation** (ReLU6, hard-swish, SiLU, GELU, sigmoid…): passed through.
* **stochastic depth** (torchvision's EfficientNet, ConvNeXt): the identity in eval mode,
  passed through; **layer norm** (ConvNeXt) passed through like batch norm.
* **permute / transpose** (ConvNeXt's channels-last blocks, ShuffleNet's channel shuffle):
  coordinates permuted back; a **linear layer over the last dimension of a map** is a 1×1
  convolution and gets its rule; a piece of **chunk / split** shifts the point by the pieces
  before it.
* **grouped and depthwise convolution**: the candidate input channels of output channel c are
  those of c's group (``groups`` split by the *input* channels per group, not the output count,
  which is the bug in the public code).
* **dilation and asymmetric/static padding** (TensorFlow "same" padding in EfficientNet's
  ``Conv2dStaticSamePadding``, ``padding="same"``): the window is taken in the padded input;
  padded positions contribute zero; the centre is clipped into the map.
* **average pooling and adaptive pooling** (incl. DenseNet transitions and AlexNet's adaptive
  6×6 pool): treated like max pooling — the argmax of the window (adaptive windows as PyTorch
  defines them, via ``adaptive_max_pool2d(return_indices=True)``).
* **mean/sum over trailing dimensions** (``x.mean((2, 3))``): a global pool, as above.
* **DenseNet concatenation**: the concatenation rule on the growing feature list.
* **explicit padding layers** (``ZeroPad2d``, ``F.pad``…): the point is shifted by the padding
  and clipped into the unpadded map.
* **multiplication by a broadcast gate** (squeeze-excitation in MobileNetV3 / EfficientNet):
  the point passes through to the gated feature map; the gate (N×C×1×1) is not backtracked.
  Products of two full-size maps send the point to both.
* **flatten / view / reshape / squeeze**: they keep the memory order, so a flat index is
  unchanged. **Basic indexing** (``x[:, 0]``, GoogLeNet's ``transform_input``) maps each point
  to the element it was read from.
* **several outputs**: a model returning a tuple or dict is backtracked from the scores
  ``cw.Model(output=...)`` picks (without it, from a tuple's first element).
* **targets beyond one class** (:mod:`..targets`): the backtrack starts from every output
  neuron the target's score reads — several classes, a ``Region``'s pixels of a dense output,
  a ``Box``'s score, or for a callable the neurons its gradient reaches — and carries their
  union down, as the authors' rules do for the kept neurons of any layer.
* **resizing** (``F.interpolate``, ``nn.Upsample``: segmentation heads, ASPP's pooled branch):
  each point moves, in its channel, to the input pixel it reads most from (the one it copies
  in ``nearest`` mode, the largest interpolation weight in the linear modes).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..checks import check_bool, check_progress
from ..model import as_model
from . import rules  # noqa: F401 - registers every rule
from .graph import FixationTracer
from .registry import ClassName, UnsupportedOperationError, rule
from .result import Fixations, gaussian_blur, outlier_mask
from .walk import backtrack

__all__ = [
    "ClassName", "Fixations", "FixationTracer", "UnsupportedOperationError", "backtrack",
    "fixations", "fixation_attribution", "gaussian_blur", "outlier_mask", "rule",
]


def fixations(
    model,
    image,
    target=None,
    *,
    outlier_removal: bool = True,
    leaf_modules: Sequence = (),
    position: str = "auto",
    progress: bool = False,
) -> Fixations:
    """CNN Fixations of ``image`` for ``target`` (None: the top-1 prediction).

    ``target``: a class index or label, a list of classes, a ``cw.targets.Region`` (a dense
    output's class over a mask of output pixels), a ``cw.targets.Box`` or a callable on a tensor
    output (:mod:`..targets`): the backtrack starts from every output neuron its score reads.

    ``model`` is a ``cw.Model`` (or a bare ``nn.Module``, wrapped with ImageNet defaults).
    Returns a :class:`Fixations` with the input points, the per-layer trace (output → input),
    ``heatmap(sigma)`` and ``box()``. ``outlier_removal`` sets the default of the result (it can
    be switched later with ``with_outlier_removal``). ``leaf_modules`` (types or qualified
    names) keeps submodules that ``torch.fx`` cannot trace as single nodes; they then need a
    rule (a known layer type) if points reach them. ``position`` picks where a convolution
    moves a point: ``"centre"`` of the window (the authors' rule), ``"argmax"`` of the chosen
    channel's contribution in the window, or ``"auto"`` (centre for stride 1, argmax for
    strided convolutions; see :func:`.rules.convolution.conv2d`). ``progress`` shows a progress bar.
    Raises :class:`UnsupportedOperationError` naming the operation when the backtrack reaches
    one without a rule. The backtrack starts from the scores ``cw.Model(output=...)`` picks out
    of a model that returns a tuple or dict (without ``output``, a tuple's first element).
    """
    model = as_model(model, "cw.fixations")
    outlier_removal = check_bool(outlier_removal, "outlier_removal", who="cw.fixations")
    progress = check_progress(progress, who="cw.fixations")
    x, _ = model.prepare(image)
    return backtrack(model.module, x, target, position=position, leaf_modules=leaf_modules,
                     progress=progress, outlier_removal=outlier_removal, output=model.output,
                     model=model)


def fixation_attribution(model, image, target=None, layer=None, sigma=None,
                         outlier_removal: bool = True):
    """CNN Fixations as an attribution method: ``(map H×W float32, raw)``.

    ``map`` is the fixation heatmap (Gaussian blur of the kept points, max 1); ``raw`` is the
    H×W float32 point mask before blurring. ``layer`` is accepted for a uniform signature and
    ignored (the backtrack always runs from the class neuron to the pixels).
    """
    fx_ = fixations(model, image, target, outlier_removal=outlier_removal)
    return fx_.heatmap(sigma).astype(np.float32), fx_.mask()
