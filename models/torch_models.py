"""PyTorch definitions of the architectures dynsparse converts that torchvision lacks.

CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of n basic
blocks at 16/32/64 channels, 1x1 projection shortcuts, global pooling, one linear layer.
Parameter names follow torchvision (conv1, bn1, layerK.I.*, downsample.0/1, fc), so the
same converter code reads torchvision and CIFAR checkpoints.
"""

import torch.nn as nn
from torchvision.models.resnet import BasicBlock


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def _stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for i in range(n):
            s = stride if i == 0 else 1
            down = None
            if s != 1 or self.inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, s, bias=False), nn.BatchNorm2d(planes)
                )
            blocks.append(BasicBlock(self.inplanes, planes, s, down))
            self.inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)
