"""CIFAR-style model zoo registered with timm: ``timm.create_model('cifar_resnet20')`` after ``import timm_tffd``.

ResNet-8 ... ResNet-110, ResNet-8x4 / 32x4, WRN-16-2 / 40-1 / 40-2 and VGG-8 / 13 as defined by the CRD repository
(HobbitLong/RepDistiller), the architectures of the Tf-FD / TFD / SFD CIFAR-100 tables.
"""
from ._base import CIFAR100_MEAN, CIFAR100_STD, CifarNet
from .cifar_resnet import CifarResNet
from .cifar_vgg import CifarVgg
from .cifar_wrn import CifarWideResNet
