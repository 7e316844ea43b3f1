"""The downstream detectors of the evaluation protocols, in plain torch: ResNet34 and a small UNet.

Why plain torch: torchvision does not install beside the CPU torch build here (DESIGN §8). The ResNet34
keeps torchvision's module names (`conv1`, `bn1`, `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`...), so
a torchvision-format state dict (e.g. ImageNet weights saved elsewhere) loads into it unchanged; only
`fc` is replaced when the number of classes differs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from evals.errors import EvalError

logger = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block (torchvision's names)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet34(nn.Module):
    """ResNet-34 (layers 3, 4, 6, 3) with torchvision's parameter names."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks, stride) in enumerate(
            ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1
        ):
            layers = [BasicBlock(inplanes, planes, stride)] + [
                BasicBlock(planes, planes) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34(num_classes: int, weights: str | Path | None = None) -> ResNet34:
    """A ResNet34, optionally initialised from a torchvision-format state dict at `weights`.

    The final `fc` is taken from the file only when its shape fits `num_classes` (an ImageNet head does
    not fit a defect-type classifier, so it is left freshly initialised).

    Raises:
        FileNotFoundError: `weights` does not exist.
        EvalError: the file's keys do not match ResNet34's (names the first missing/unexpected ones).
    """
    model = ResNet34(num_classes)
    if weights is None:
        return model
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"ResNet34 weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    if state.get("fc.weight") is not None and state["fc.weight"].shape != own["fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise EvalError(
            f"{path} is not a torchvision-format ResNet34 state dict: missing {missing[:3]}, unexpected "
            f"{list(unexpected)[:3]}; save `model.state_dict()` of torchvision's resnet34"
        )
    logger.info("ResNet34 initialised from %s", path)
    return model


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A UNet (Ronneberger et al.) with `depth` down/up stages and `base` channels at full resolution;
    one output channel of logits (anomaly vs normal per pixel).

    Why configurable width: the protocol fixes the architecture family, not its size; on a CPU a base of
    16 trains in seconds at 128 px. Input sides must be divisible by 2**depth.
    """

    def __init__(self, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = _double_conv(3, widths[0])
        self.downs = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_convs = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        h = skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            h = conv(torch.cat([skips.pop(), up(h)], dim=1))
        return self.head(h)
