"""Network building blocks shared by the D-VAE (dvae/model.py) and the evaluation classifiers (eval/classifiers.py)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock"]


class BasicBlock(nn.Module):
    """The CIFAR ResNet BasicBlock: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))
