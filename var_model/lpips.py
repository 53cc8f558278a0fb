"""LPIPS perceptual distance on a VGG16 backbone (Zhang et al. 2018; richzhang/PerceptualSimilarity,
the `lpips` package; vaex `utils/lpips.py` uses the same network for the tokenizer recipe).

The weights come from two files and are never downloaded here:
- the backbone: torchvision's vgg16 state dict (`features.0.weight` ... `features.28.bias`; a whole
  vgg16 file with its classifier keys loads too, only `features.*` is read);
- the linear heads: LPIPS's `weights/v0.1/vgg.pth` (`lin0.model.1.weight` ... `lin4.model.1.weight`).
The module's own state dict has exactly those keys, so either file loads into it as it is.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

VGG16_FILE_NAME = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file in the hub cache
LPIPS_LIN_FILE_NAME = "vgg.pth"

# torchvision's vgg16 config "D": conv widths, "M" a 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Index in `features` just past each tapped ReLU: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAP_ENDS = (4, 9, 16, 23, 30)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional trunk with torchvision's module indices (so its keys match)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


class LinearHead(nn.Module):
    """LPIPS's NetLinLayer: (dropout, unused in eval) then a bias-free 1x1 conv to one channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 0 is LPIPS's dropout slot; keeping it makes the key `model.1.weight`.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each spatial position's feature vector to unit length (LPIPS `normalize_tensor`)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS(x, y) for images in [-1, 1], averaged over the batch; grey images are repeated to RGB.

    Frozen and always in eval mode; gradients flow to the inputs only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (LinearHead(c) for c in _TAP_CHANNELS)
        # LPIPS's ScalingLayer; not persistent, so the state dict is exactly the two files' keys.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # A fixed metric: never leave eval mode, whatever the surrounding model does.
        return super().train(False)

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five VGG activations (relu1_2 ... relu5_3) of scaled images."""
        outputs, start, h = [], 0, images
        for end in _TAP_ENDS:
            for index in range(start, end):
                h = self.features[index](h)
            outputs.append(h)
            start = end
        return outputs

    def forward(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Scalar: sum over the five layers of the spatially and batch averaged weighted distance."""
        both = torch.cat([images, reconstruction], dim=0).float()
        if both.shape[1] == 1:
            both = both.repeat(1, 3, 1, 1)
        batch = images.shape[0]
        distance = both.new_zeros(())
        heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        for tap, head in zip(self.taps((both - self.shift) / self.scale), heads):
            difference = (unit_normalize(tap[:batch]) - unit_normalize(tap[batch:])).square()
            distance = distance + head.model(difference).mean()
        return distance


def default_vgg16_path() -> Path:
    """Where torchvision keeps its vgg16 ImageNet weights: torch.hub.get_dir()/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE_NAME


def find_lpips_lin_file() -> Path | None:
    """The LPIPS heads file `vgg.pth`: under torch's hub folder, or inside an installed `lpips` package."""
    hub = Path(torch.hub.get_dir())
    for candidate in (hub / "checkpoints" / LPIPS_LIN_FILE_NAME, hub / LPIPS_LIN_FILE_NAME):
        if candidate.is_file():
            return candidate
    if hub.is_dir():
        found = sorted(hub.rglob(LPIPS_LIN_FILE_NAME))
        if found:
            return found[0]
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "weights" / "v0.1" / LPIPS_LIN_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


VGG16_HOW_TO_GET = (
    "torchvision's vgg16 ImageNet state dict; on a machine with internet, "
    "`python -c \"import torchvision; torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` "
    f"saves it as {VGG16_FILE_NAME} in torch's hub cache (torch.hub.get_dir()/checkpoints/)"
)
LPIPS_LIN_HOW_TO_GET = (
    "LPIPS's linear heads: lpips/weights/v0.1/vgg.pth in the `lpips` PyPI package "
    "(`pip install lpips`, or `pip download lpips` and unzip the wheel), "
    "also at github.com/richzhang/PerceptualSimilarity/tree/master/lpips/weights/v0.1"
)


def _load_state(path: Path, what: str, how_to_get: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}; it is {how_to_get}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def build_lpips(vgg_path: str | Path | None = None, lin_path: str | Path | None = None) -> LPIPS:
    """LPIPS from a torchvision vgg16 state dict and LPIPS's `vgg.pth` heads; never downloads.

    Unset paths are looked up in torch's hub cache (see `default_vgg16_path`, `find_lpips_lin_file`).
    A missing file raises FileNotFoundError with one line naming the file and how to obtain it.
    """
    vgg_file = Path(vgg_path) if vgg_path is not None else default_vgg16_path()
    lin_file = Path(lin_path) if lin_path is not None else find_lpips_lin_file()
    if lin_file is None:
        lin_file = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_LIN_FILE_NAME  # named in the error
    vgg_state = _load_state(vgg_file, "LPIPS VGG16", VGG16_HOW_TO_GET)
    lin_state = _load_state(lin_file, "LPIPS linear-head", LPIPS_LIN_HOW_TO_GET)

    model = LPIPS()
    features = {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
    model.features.load_state_dict(features, strict=True)
    heads = {k: v for k, v in lin_state.items() if k.startswith("lin")}
    expected_heads = {f"lin{i}.model.1.weight" for i in range(5)}
    if heads.keys() != expected_heads:
        raise ValueError(f"{lin_file}: expected LPIPS head keys {sorted(expected_heads)}, got {sorted(heads)}")
    model.load_state_dict({**model.state_dict(), **heads}, strict=True)
    return model
