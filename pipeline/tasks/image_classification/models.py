"""Image model architectures, chosen by `model.name` in conf/model/ (mlp, cnn, resnet,
tanh_cnn, scatter_linear).

Every model maps normalised pixels, float32 [batch, channels, height, width], to logits
[batch, num_classes]: the contract that export and serving rely on. The convolutional
models take `norm`: "batch" (BatchNorm) or "group" (GroupNorm, whose statistics are per
image: differentially private training cannot use BatchNorm, which mixes a batch).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.tasks.image_classification.scattering import Scattering2D

MODELS = ("mlp", "cnn", "resnet", "tanh_cnn", "scatter_linear")
NORMS = ("batch", "group")


def norm_layer(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        if channels % groups:
            raise ValueError(f"model.groups: {channels} channels are not divisible into "
                             f"{groups} groups")
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"model.norm: unknown norm {norm!r} ({', '.join(NORMS)})")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the norm that follows every convolution has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class MLP(nn.Module):
    """Flattened pixels through fully connected layers with ReLU and dropout."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int,
                 hidden: Sequence[int] = (512, 256), dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = channels * height * width
        for units in hidden:
            layers += [nn.Linear(size, units), nn.ReLU(), nn.Dropout(dropout)]
            size = units
        layers.append(nn.Linear(size, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.layers(pixels)


def block_widths(entry: int | Sequence[int]) -> tuple[int, int]:
    """A CNN block's two convolution widths from its `widths` entry: one number for
    both, or a pair (what channel pruning leaves when it keeps different counts)."""
    if isinstance(entry, int):
        return entry, entry
    pair = tuple(entry)
    if len(pair) != 2:
        raise ValueError(f"model.widths: a block is one width or a pair, not {list(pair)}")
    return pair


class CNN(nn.Module):
    """The classic small convnet: blocks of two 3x3 convolutions (each with norm and
    ReLU), 2x2 max pooling and dropout; then a hidden fully connected layer. `widths`
    has one entry per block (see `block_widths`)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int,
                 widths: Sequence[int | Sequence[int]] = (32, 64), hidden: int = 256,
                 dropout: float = 0.25, norm: str = "batch", groups: int = 8):
        super().__init__()
        blocks: list[nn.Module] = []
        size = channels
        for entry in widths:
            first, second = block_widths(entry)
            blocks += [conv3x3(size, first), norm_layer(norm, first, groups), nn.ReLU(),
                       conv3x3(first, second), norm_layer(norm, second, groups), nn.ReLU(),
                       nn.MaxPool2d(2), nn.Dropout(dropout)]
            size = second
        self.features = nn.Sequential(*blocks)
        # Each pooling halves the sides, rounding down (7x7 -> 3x3).
        side_h, side_w = height >> len(widths), width >> len(widths)
        if side_h < 1 or side_w < 1:
            raise ValueError(f"model.widths: {len(widths)} pooling blocks leave nothing of "
                             f"a {height}x{width} image")
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(size * side_h * side_w, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with norms, added to the input (through a strided 1x1
    projection where the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str,
                 groups: int):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, stride), norm_layer(norm, out_channels, groups),
            nn.ReLU(), conv3x3(out_channels, out_channels),
            norm_layer(norm, out_channels, groups))
        # The last norm's scale starts at zero, so each block starts as the identity and
        # the signal passes through the untrained network undamped (Goyal et al., 2017).
        nn.init.zeros_(self.body[-1].weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm_layer(norm, out_channels, groups))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A 3x3 stem, stages of basic blocks (stride 2 between stages), global average
    pooling and a linear classifier."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int,
                 widths: Sequence[int] = (32, 64, 128), blocks: int = 2, norm: str = "batch",
                 groups: int = 8):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(channels, widths[0]),
                                  norm_layer(norm, widths[0], groups), nn.ReLU())
        stages: list[nn.Module] = []
        size = widths[0]
        for stage, out in enumerate(widths):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(size, out, stride, norm, groups))
                size = out
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(size, num_classes)

    def forward(self, pixels: Tensor) -> Tensor:
        # A mean over the spatial axes: any input size, exported as one ReduceMean.
        return self.classifier(self.stages(self.stem(pixels)).mean(dim=(2, 3)))


class TanhCNN(nn.Module):
    """The end-to-end CNN that differentially private training is measured with
    (Papernot et al. 2021, "Tempered Sigmoid Activations for Deep Learning with
    Differential Privacy"; Tramer & Boneh 2021's baseline): tanh activations, whose
    bounded outputs keep clipped per-example gradients informative; no norm layers
    (nothing mixes examples, and nothing needs per-image statistics); large strided
    kernels, each convolution followed by 2x2 max pooling at stride 1; a small hidden
    layer. About 26,000 parameters on 28x28 images: few parameters, little noise."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int,
                 convs: Sequence[Sequence[int]] = ((16, 8, 2, 2), (32, 4, 2, 0)),
                 hidden: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        size = channels
        for filters, kernel, stride, padding in convs:
            layers += [nn.Conv2d(size, filters, kernel, stride=stride, padding=padding),
                       nn.Tanh(), nn.MaxPool2d(2, stride=1)]
            size = filters
            # The convolution's output side, then one less for the pooling.
            height = (height + 2 * padding - kernel) // stride
            width = (width + 2 * padding - kernel) // stride
            if height < 1 or width < 1:
                raise ValueError(f"model.convs: {list(convs)} leave nothing of the image")
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(size * height * width, hidden),
                                  nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.features(pixels))


class ScatterLinear(nn.Module):
    """A linear classifier over fixed scattering features (Tramer & Boneh 2021's
    "ScatterNet + linear", 89.7% on Fashion-MNIST at epsilon 3): the scattering
    transform (scattering.py), each group of its channels normalised per image
    (GroupNorm without parameters: nothing learnt, nothing mixed across a batch), then
    one linear layer. Only the linear layer trains, so training computes the
    features once per image instead of every epoch (pipeline/tasks/fixed_features.py)."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int,
                 J: int = 2, L: int = 8, groups: int = 27):
        super().__init__()
        self.fixed_features = Scattering2D(height, width, J, L)
        features = channels * self.fixed_features.output_channels
        if features % groups:
            raise ValueError(f"model.groups: {features} scattering channels are not "
                             f"divisible into {groups} groups")
        self.head = nn.Sequential(
            nn.GroupNorm(groups, features, affine=False), nn.Flatten(),
            nn.Linear(features * (height >> J) * (width >> J), num_classes))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.fixed_features(pixels))


def fixed_front(config: dict, channels: int, height: int, width: int) -> nn.Module | None:
    """The fixed first stage of the model `config` names (pipeline/tasks/
    fixed_features.py), or None for a model that learns from the pixels up."""
    model = build_model(config, channels, height, width, num_classes=2)
    return getattr(model, "fixed_features", None)


def build_model(config: dict, channels: int, height: int, width: int, num_classes: int
                ) -> nn.Module:
    """The model `config["name"]` names, with the rest of `config` as its options (an
    unknown option is a TypeError naming it)."""
    classes = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "tanh_cnn": TanhCNN,
               "scatter_linear": ScatterLinear}
    name = config.get("name")
    if name not in classes:
        raise ValueError(f"model.name: unknown model {name!r} ({', '.join(MODELS)})")
    options = {k: v for k, v in config.items() if k != "name"}
    return classes[name](channels, height, width, num_classes, **options)
