"""Image loading and the CoOp/CLIP transforms."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from ..errors import InvalidDataError, MissingDataError, one_line

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CorruptImageError(InvalidDataError):
    """An image file that exists but cannot be decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is reported with its path."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as an image (its header is decoded, not its pixels), or None: a cheap check
    of every file a run will read, made before any work."""
    try:
        with Image.open(path) as im:
            if im.size[0] < 1 or im.size[1] < 1:
                return f"empty {im.size[0]}x{im.size[1]} image"
    except FileNotFoundError:
        return "missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return one_line(str(err)) or type(err).__name__
    return None


def build_transform(kind: str, image_size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> T.Compose:
    """`test`: resize the shorter side + center crop (Dassl's test pipeline); `train`: CoOp's
    random_resized_crop (scale 0.08-1) + horizontal flip; `train_flip`: Tip-Adapter's crop (scale 0.5-1) + flip."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    bicubic = T.InterpolationMode.BICUBIC
    if kind == "test":
        return T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), *norm])
    if kind == "train":
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(), *norm])
    if kind == "train_flip":
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(p=0.5), *norm])
    raise ValueError(f"unknown transform {kind!r}; expected test, train or train_flip")


class ImageListDataset(torch.utils.data.Dataset):
    """Torch dataset over `Datum`s: returns (image tensor, label, index)."""

    def __init__(self, items, transform):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        return self.transform(load_image(d.impath)), d.label, i
