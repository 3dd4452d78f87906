"""Network definitions, the ``NETWORKS`` registry (one entry per ``train.model``), and batched inference.

Every network takes images scaled to [0, 1] (N×C×H×W) and returns class logits. Input
standardisation (mean/std of the training split) is a fixed buffer inside the model, so a
checkpoint is self-contained and Captum attributes in the image's own [0, 1] space. ReLUs are
never in-place, which some Captum methods require.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import types
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network before loading its weights."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    width: int
    mean: float
    std: float
    norm: str = "batch"  # train.norm: batch | group
    ndim: int = 2  # spatial dimensions of the data: 2 (images, N×C×H×W) or 3 (volumes, N×C×D×H×W)


# train.norm: batch normalisation, or group normalisation (Wu & He 2018: up to 8 groups that
# divide the channels), which normalises each image on its own: the same in one process or
# many (data-parallel ranks see different batch statistics), and what DP-SGD needs.
NORMS: dict[str, Callable[[int, int], nn.Module]] = {
    "batch": lambda channels, ndim: (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(channels),
    "group": lambda channels, ndim: nn.GroupNorm(math.gcd(channels, 8), channels),
}


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that trains on the CPU in the channels-last-3d layout.

    oneDNN's Conv3d backward pass is slow on contiguous (N×C×D×H×W) tensors with few channels:
    on the reference CPU, the default small CNN's 12→12 convolution at 16³ takes 85 ms of a
    240 ms training step, against 30 ms in channels-last. Converting each convolution's input
    to that layout and its output back (the norms and pools stay contiguous, where they are
    faster) makes the whole step about 20% faster (138 vs 172 ms per batch of 64 volumes of
    32³). Inference and input gradients (Captum) are faster contiguous, so only training
    converts. Weights stay contiguous: checkpoints are unchanged, and the state_dict keys are
    those of ``nn.Conv3d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu":
            return super().forward(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()
        return super().forward(x)


# The layers that differ between images and volumes; every network is written once for both,
# and the data's dimensionality (prepare's meta) picks them: no param switches 2-D and 3-D.
CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: Conv3d}
MAX_POOL: dict[int, type[nn.Module]] = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def spatial(x: torch.Tensor) -> tuple[int, ...]:
    """The spatial axes of a batch (2, 3) or (2, 3, 4), for global pooling."""
    return tuple(range(2, x.ndim))


class SeedCNN(nn.Module):
    """The seed design, exactly: Conv2d(C,16,3,p=1) → ReLU → MaxPool2d(2) → Linear(→128) → ReLU → Linear
    (for volumes the same with Conv3d and MaxPool3d)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, ndim: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            CONV[ndim](in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=False),
            MAX_POOL[ndim](2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * (image_size // 2) ** ndim, 128),
            nn.ReLU(inplace=False),
            nn.Linear(128, num_classes),
        )

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """Three conv → batch norm → ReLU → max-pool blocks (width w, 2w, 4w), global pooling, linear.

    Global max and average pooling are concatenated: max pooling suits detection (one small
    finding anywhere decides the class), average pooling keeps diffuse evidence.

    For volumes the first convolution has stride 2: a 3×3×3 kernel costs three times a 3×3
    one at eight times the voxels of a 2-D image of the same side, and the strided stem keeps
    a 32³ volume's training step as fast as a 64² image's (408 vs 467 images/s measured on
    the reference CPU, against 38 without it).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, norm: str = "batch", ndim: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for block, out in enumerate((width, 2 * width, 4 * width)):
            blocks += [
                CONV[ndim](channels, out, kernel_size=3, padding=1, bias=False, stride=2 if ndim == 3 and not block else 1),
                NORMS[norm](out, ndim),
                nn.ReLU(inplace=False),
                CONV[ndim](out, out, kernel_size=3, padding=1, bias=False),
                NORMS[norm](out, ndim),
                nn.ReLU(inplace=False),
                MAX_POOL[ndim](2),
            ]
            channels = out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(2 * channels, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[-2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        pooled = torch.cat([maps.amax(dim=spatial(maps)), maps.mean(dim=spatial(maps))], dim=1)
        return self.classifier(pooled)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers and an identity (or 1×1 projection) shortcut."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, norm: str = "batch", ndim: int = 2) -> None:
        super().__init__()
        self.conv1 = CONV[ndim](channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = NORMS[norm](channels_out, ndim)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = CONV[ndim](channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = NORMS[norm](channels_out, ndim)
        self.relu2 = nn.ReLU(inplace=False)  # a separate module per use, for Captum's ReLU hooks
        self.shortcut = nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            CONV[ndim](channels_in, channels_out, 1, stride=stride, bias=False), NORMS[norm](channels_out, ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 style (He et al. 2016), written here because torchvision has no CPU build on our machines.

    Four stages of ``blocks`` basic blocks with widths w, 2w, 4w, 8w (w = ``train.width``; 64
    is ResNet-18's). The stem follows the image size, as MedMNIST's 28 px ResNets do: a 3×3
    stride-1 conv for images up to 64 px, ResNet's 7×7 stride-2 conv and max-pool above. Volumes
    (MedMNIST 3-D's ResNet-18 + 3D) use the same layout with 3-D layers and a stride-2 3×3×3 stem.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, image_size: int,
                 blocks: tuple[int, ...] = (2, 2, 2, 2), norm: str = "batch", ndim: int = 2) -> None:
        super().__init__()
        conv, bn = CONV[ndim], (lambda c: NORMS[norm](c, ndim))
        if ndim == 3:
            stem = [conv(in_channels, width, 3, stride=2, padding=1, bias=False), bn(width), nn.ReLU(inplace=False)]
        elif image_size <= 64:
            stem = [conv(in_channels, width, 3, padding=1, bias=False), bn(width), nn.ReLU(inplace=False)]
        else:
            stem = [conv(in_channels, width, 7, stride=2, padding=3, bias=False), bn(width),
                    nn.ReLU(inplace=False), MAX_POOL[ndim](3, stride=2, padding=1)]
        layers: list[nn.Module] = [nn.Sequential(*stem)]
        channels = width
        for stage, count in enumerate(blocks):
            out = width * 2**stage
            for b in range(count):
                layers.append(BasicBlock(channels, out, 2 if b == 0 and stage > 0 else 1, norm, ndim))
                channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    @property
    def cam_layer(self) -> nn.Module:
        return self.features[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(x)
        return self.classifier(maps.mean(dim=spatial(maps)))


def small_stem(config: ModelConfig) -> bool:
    """Whether a network opens without the ImageNet stem's 4× downsampling: images up to 64 px
    (MedMNIST's 28 and 64) and every volume. ImageNet's 7×7 stride-2 convolution and max-pool
    leave a 28 px image 7 px wide before the first block, and DenseNet-121 or EfficientNet then
    run out of pixels ("output size is too small"); MedMNIST's own ResNets use a 3×3 stride-1
    stem at 28 px for the same reason. Volumes (28-64 voxels a side) take a 3×3×3 stride-2 stem."""
    return config.ndim == 3 or config.image_size <= 64


def _stem_conv(config: ModelConfig, out: int, stride: int | None = None) -> nn.Module:
    stride = stride or (2 if config.ndim == 3 else 1)
    return CONV[config.ndim](config.in_channels, out, kernel_size=3, stride=stride, padding=1, bias=False)


def _residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ``ResNetBlock``/``ResNetBottleneck.forward`` with the residual added out of place
    (``out += residual`` on a hooked tensor breaks Opacus' per-image gradients) and one ReLU
    module per use (Captum's ReLU hooks need it; MONAI calls ``act`` two or three times)."""
    residual = x if self.downsample is None else self.downsample(x)
    out = self.act(self.bn1(self.conv1(x)))
    if hasattr(self, "conv3"):  # bottleneck
        out = self.bn3(self.conv3(self.act_mid(self.bn2(self.conv2(out)))))
    else:
        out = self.bn2(self.conv2(out))
    return self.act_out(out + residual)


def _se_residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ``SEBlock.forward`` with the residual added out of place."""
    residual = self.project(x)
    return self.act(self.se_layer(self.conv3(self.conv2(self.conv1(x)))) + residual)


class MonaiNet(nn.Module):
    """One of MONAI's classification networks (``monai.networks.nets``), 2-D or 3-D from the data.

    MONAI builds the network as published; the builders below give it a small-input stem where
    :func:`small_stem` says so, and this wrapper makes every activation out of place (Captum's
    ReLU hooks and gradients need it), swaps its batch norms for ``train.norm``'s and names the
    layer Grad-CAM reads (``cam``, a dotted module path: the last feature map before pooling).
    """

    def __init__(self, net: nn.Module, cam: str, norm: str) -> None:
        super().__init__()
        self.net = net
        self.cam = cam
        from monai.networks.blocks.squeeze_and_excitation import SEBlock
        from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

        for module in net.modules():
            if getattr(module, "inplace", False):
                module.inplace = False
        for module in list(net.modules()):
            if isinstance(module, (ResNetBlock, ResNetBottleneck)):
                module.act_mid, module.act_out = copy.deepcopy(module.act), copy.deepcopy(module.act)  # stateless
                module.forward = types.MethodType(_residual_forward, module)
            elif isinstance(module, SEBlock):
                module.forward = types.MethodType(_se_residual_forward, module)
            if norm != "batch":  # MONAI's norm arguments miss some layers (ResNet's shortcuts): swap every one
                for name, child in module.named_children():
                    if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm3d)):
                        ndim = 2 if isinstance(child, nn.BatchNorm2d) else 3
                        setattr(module, name, NORMS[norm](child.num_features, ndim))

    @property
    def cam_layer(self) -> nn.Module:
        return self.net.get_submodule(self.cam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _monai_resnet(config: ModelConfig, block: str, layers: list[int]) -> MonaiNet:
    """MONAI's ResNet with widths w, 2w, 4w, 8w (w = ``train.width``; 64 is the published one)."""
    from monai.networks.nets import ResNet as MonaiResNet

    small = small_stem(config)
    w = config.width
    return MonaiNet(MonaiResNet(
        block=block, layers=layers, block_inplanes=[w, 2 * w, 4 * w, 8 * w], spatial_dims=config.ndim,
        n_input_channels=config.in_channels, conv1_t_size=3 if small else 7,
        conv1_t_stride=2 if config.ndim == 3 or not small else 1, no_max_pool=small, shortcut_type="B",
        num_classes=config.num_classes, bias_downsample=False, act=("relu", {"inplace": False})), "layer4", config.norm)


def _monai_densenet121(config: ModelConfig) -> MonaiNet:
    """DenseNet-121 (Huang et al. 2017; CheXNet's network): growth 32, blocks 6-12-24-16."""
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=config.ndim, in_channels=config.in_channels, out_channels=config.num_classes,
                      act=("relu", {"inplace": False}))
    if small_stem(config):
        net.features.conv0 = _stem_conv(config, 64)
        net.features.pool0 = nn.Identity()
    return MonaiNet(net, "features.norm5", config.norm)


def _monai_efficientnet_b0(config: ModelConfig) -> MonaiNet:
    """EfficientNet-B0 (Tan & Le 2019), with plain (not memory-efficient) Swish so that every
    gradient is autograd's own; random initialisation (``train.pretrained`` loads weights)."""
    from monai.networks.nets import EfficientNetBN

    net = EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=config.ndim,
                         in_channels=config.in_channels, num_classes=config.num_classes)
    net.set_swish(memory_efficient=False)
    if small_stem(config):
        # The stem and the second stage keep the resolution (volumes too: the 5×5×5 stages need
        # voxels left): a 28 px image ends in a 3×3 map instead of 1×1, where batch statistics
        # of one value per image blow the first gradients up (×1000) and Grad-CAM has one cell.
        net._conv_stem = _stem_conv(config, net._conv_stem.out_channels, stride=1)
        net._conv_stem_padding = nn.Identity()  # the new convolutions pad themselves
        first = net._blocks[1][0]
        first._depthwise_conv.stride = (1,) * config.ndim
        first._depthwise_conv.padding = tuple(k // 2 for k in first._depthwise_conv.kernel_size)
        first._depthwise_conv_padding = nn.Identity()
    return MonaiNet(net, "_bn1", config.norm)  # the head's Swish module is shared with the stem's: one use per layer


def _monai_seresnext50(config: ModelConfig) -> MonaiNet:
    """SE-ResNeXt-50 (32×4d, squeeze-and-excitation; Hu et al. 2018)."""
    from monai.networks.nets import SEResNeXt50

    net = SEResNeXt50(spatial_dims=config.ndim, in_channels=config.in_channels, num_classes=config.num_classes)
    if small_stem(config):
        net.layer0.conv1 = _stem_conv(config, 64)
        net.layer0.pool = nn.Identity()
    return MonaiNet(net, "layer4", config.norm)


class Classifier(nn.Module):
    """A network behind a fixed input standardisation; what every stage loads and calls."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32))
        self.net = _build_net(config)

    @property
    def cam_layer(self) -> nn.Module:
        """The layer Grad-CAM reads: the last convolutional feature map."""
        return self.net.cam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Ensemble(nn.Module):
    """The fold models of a cross-validation as one network (``cv.folds``): each member's class
    probabilities after its own temperature (fitted on its own held-out fold), averaged.

    ``forward`` returns the log of the mean probability, so the softmax every stage applies
    to a network's output gives that mean exactly, and the package, ``predict``, serving,
    Captum and ONNX take an ensemble wherever they take one network. Grad-CAM reads every
    member's last feature map (``cam_layers``) and averages the maps of the ensemble's output.
    """

    def __init__(self, members: list[Classifier], temperatures: list[float]) -> None:
        super().__init__()
        if len(members) != len(temperatures) or len(members) < 2:
            raise PipelineError(f"an ensemble needs two or more members, one temperature each "
                                f"(got {len(members)} members, {len(temperatures)} temperatures)")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

    @property
    def config(self) -> ModelConfig:
        """The first member's config: every member shares the architecture (only the training
        images' mean and standard deviation differ, and those live in each member's buffers)."""
        return self.members[0].config

    @property
    def configs(self) -> list[ModelConfig]:
        return [member.config for member in self.members]

    @property
    def cam_layers(self) -> list[nn.Module]:
        return [member.cam_layer for member in self.members]

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """N × members × classes: each member's calibrated class probabilities."""
        return torch.stack([torch.softmax(member(x) / t, dim=1) for member, t in zip(self.members, self.temperatures)],
                           dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.member_probabilities(x).mean(dim=1).clamp_min(torch.finfo(x.dtype).tiny))


NETWORKS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "seed_cnn": lambda c: SeedCNN(c.in_channels, c.num_classes, c.image_size, c.ndim),
    "small_cnn": lambda c: SmallCNN(c.in_channels, c.num_classes, c.width, c.norm, c.ndim),
    "resnet18": lambda c: ResNet(c.in_channels, c.num_classes, c.width, c.image_size, norm=c.norm, ndim=c.ndim),
    # MONAI's networks (monai.networks.nets), the ones this field reaches for first
    "monai_resnet18": lambda c: _monai_resnet(c, "basic", [2, 2, 2, 2]),
    "resnet50": lambda c: _monai_resnet(c, "bottleneck", [3, 4, 6, 3]),
    "densenet121": _monai_densenet121,
    "efficientnet_b0": _monai_efficientnet_b0,
    "seresnext50": _monai_seresnext50,
}
# The networks whose channel widths follow train.width (the others keep their published widths).
WIDTH_NETWORKS = ("small_cnn", "resnet18", "monai_resnet18", "resnet50")
MONAI_NETWORKS = ("monai_resnet18", "resnet50", "densenet121", "efficientnet_b0", "seresnext50")


def _build_net(config: ModelConfig) -> nn.Module:
    if config.name not in NETWORKS:
        raise PipelineError(f"unknown model '{config.name}' (known: {', '.join(NETWORKS)})")
    return NETWORKS[config.name](config)


def build_model(config: ModelConfig) -> Classifier:
    return Classifier(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×C (volumes: N×D×H×W×C) uint8 → N×C×H×W (N×C×D×H×W) float32 in [0, 1], the input
    every network expects."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, 1).float().div_(255.0)


def channels_last(x: torch.Tensor) -> np.ndarray:
    """One network input C×H×W (C×D×H×W) back to the stored layout H×W×C (D×H×W×C)."""
    return x.detach().movedim(0, -1).numpy()


def folded(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` (eval mode) with every batch norm folded into the
    convolution before it: one layer's work instead of two, the same outputs up to float32
    rounding (about 1e-6 on the logits). Our networks register each ``BatchNorm`` right after the
    convolution it normalises, in the same module; those pairs are folded and the norm becomes
    an ``Identity``, so module names and indices (Grad-CAM's layer) stay where they were."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    copy_ = copy.deepcopy(model).eval()
    for module in list(copy_.modules()):
        children = list(module.named_children())
        for (name, conv), (norm_name, norm) in itertools.pairwise(children):
            if isinstance(conv, (nn.Conv2d, nn.Conv3d)) and isinstance(norm, (nn.BatchNorm2d, nn.BatchNorm3d)):
                setattr(module, name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
    return copy_


@torch.no_grad()
def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 64,
                  device: torch.device | None = None,
                  activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Probabilities (float64) for uint8 images: softmax over the logits (N×K), or the task's
    ``activation`` (:mod:`pipeline.tasks`: sigmoid per finding, grade probabilities), in batches, in eval mode, through
    :func:`folded` (about 1.3× the images per second of the unfolded network on the reference CPU).

    Batches of 64 keep a 64-px batch's activations in the CPU's cache: about 1.8× the images
    per second of batches of 256 on the reference machine, with identical outputs (checked on
    the default network).
    """
    device = device or torch.device("cpu")
    model.eval()
    network = folded(model).to(device)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images_to_tensor(np.asarray(images[start:start + batch_size])).to(device)
        logits = network(batch)
        chunks.append((torch.softmax(logits, dim=1) if activation is None else activation(logits)).double().cpu().numpy())
    return np.concatenate(chunks)
