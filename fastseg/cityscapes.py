"""Cityscapes on disk: the class table, the curriculum profiles, listing a split and decoding one sample.

The official layout is read, the same as torchvision's ``Cityscapes``::

    <data_dir>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <data_dir>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   used when present
    <data_dir>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png        otherwise
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import Cityscapes

from fastseg.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Class table: everything derived from torchvision's Cityscapes table, never typed in by hand.

NUM_CLASSES = 19
IGNORE_INDEX = 255

_TRAIN_CLASSES = sorted(
    (c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id
)
if [c.train_id for c in _TRAIN_CLASSES] != list(range(NUM_CLASSES)):
    raise RuntimeError("torchvision's Cityscapes class table no longer has train ids 0..18")

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in _TRAIN_CLASSES)

# uint8 label files store id -1 ("license plate") as 255; `% 256` maps it there, and train id -1 to 255.
ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
VALID_LABEL_IDS = np.zeros(256, dtype=bool)
for _c in Cityscapes.classes:
    ID_TO_TRAIN_ID[_c.id % 256] = _c.train_id % 256
    VALID_LABEL_IDS[_c.id % 256] = True

VALID_TRAIN_IDS = np.zeros(256, dtype=bool)
VALID_TRAIN_IDS[:NUM_CLASSES] = True
VALID_TRAIN_IDS[IGNORE_INDEX] = True

# Predictions written for the official tools: train id -> label id; the ignore value becomes 0 ("unlabeled").
TRAIN_ID_TO_ID = np.zeros(256, dtype=np.uint8)
TRAIN_ID_COLORS = np.zeros((256, 3), dtype=np.uint8)
for _c in _TRAIN_CLASSES:
    TRAIN_ID_TO_ID[_c.train_id] = _c.id
    TRAIN_ID_COLORS[_c.train_id] = _c.color
del _c

# ImageNet statistics on the 0-1 scale: the convention of Fast-SCNN and torchvision backbones. Fixed on
# purpose, so every stage, checkpoint and export sees the same input scaling.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """Colour image (H×W×3 uint8) of a train-id map, with the ignore value black."""
    return TRAIN_ID_COLORS[np.asarray(train_ids, dtype=np.uint8)]


# ---------------------------------------------------------------------------------------------------------
# Curriculum profiles: the one home of the sizes every script uses.


@dataclass(frozen=True)
class Profile:
    """A curriculum stage's input sizes: images resized to ``resize``, training crops of ``patch`` (W, H)."""

    index: int
    resize: tuple[int, int]
    patch: tuple[int, int]

    @property
    def resize_hw(self) -> tuple[int, int]:
        return self.resize[1], self.resize[0]

    @property
    def patch_hw(self) -> tuple[int, int]:
        return self.patch[1], self.patch[0]


PROFILES: dict[int, Profile] = {
    1: Profile(1, (576, 288), (448, 224)),
    2: Profile(2, (768, 384), (576, 288)),
    3: Profile(3, (1024, 512), (768, 384)),
    4: Profile(4, (1536, 768), (1152, 576)),
    5: Profile(5, (2048, 1024), (1536, 768)),
}


def get_profile(k: int | Profile) -> Profile:
    """The profile with index ``k`` (a :class:`Profile` is returned as is)."""
    if isinstance(k, Profile):
        return k
    if k not in PROFILES:
        raise UserError(
            f"--profile {k}: no such profile; choose one of {', '.join(map(str, sorted(PROFILES)))}"
        )
    return PROFILES[k]


# ---------------------------------------------------------------------------------------------------------
# Listing the official layout.

_IMAGE_SUFFIX = "_leftImg8bit.png"
_TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"
_LABEL_ID_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``name`` is ``<city>_<seq>_<frame>``."""

    image: Path
    label: Path
    name: str
    city: str

    @property
    def label_is_train_ids(self) -> bool:
        return self.label.name.endswith(_TRAIN_ID_SUFFIX)


def _missing_data_dir(data_dir: Path) -> UserError:
    return UserError(
        f"{data_dir}: data directory not found; point --data-dir at a Cityscapes copy (with leftImg8bit/ and "
        f"gtFine/) or make a synthetic one with `python tools/synthetic.py {data_dir}`"
    )


def list_samples(data_dir: str | Path, split: str) -> list[Sample]:
    """Every image of ``split`` with its label, sorted by city and name; a missing label is an error."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise _missing_data_dir(data_dir)
    data_dir = data_dir.resolve()
    image_root = data_dir / "leftImg8bit" / split
    label_root = data_dir / "gtFine" / split
    if not image_root.is_dir():
        raise UserError(
            f"{image_root}: no such directory; --data-dir must hold the Cityscapes layout "
            f"leftImg8bit/{split}/<city>/*{_IMAGE_SUFFIX} (or make one with `python tools/synthetic.py`)"
        )
    images = sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise UserError(
            f"{image_root}: split '{split}' has no images; expected <city>/<name>{_IMAGE_SUFFIX} files there"
        )
    samples, missing = [], []
    for image in images:
        city = image.parent.name
        name = image.name[: -len(_IMAGE_SUFFIX)]
        label = label_root / city / f"{name}{_TRAIN_ID_SUFFIX}"
        if not label.is_file():
            label = label_root / city / f"{name}{_LABEL_ID_SUFFIX}"
            if not label.is_file():
                missing.append((image, label))
                continue
        samples.append(Sample(image=image, label=label, name=name, city=city))
    if missing:
        image, label = missing[0]
        more = f" (and {len(missing) - 1} more images without labels)" if len(missing) > 1 else ""
        raise UserError(
            f"{image}: no label; expected {label}{more}; add the gtFine files or remove the image"
        )
    return samples


# ---------------------------------------------------------------------------------------------------------
# Decoding one sample. PIL decodes (libpng through zlib, the stable path); torch's uint8 resize (AVX2,
# antialiased) is ~6× faster than PIL's. Resizes use half-pixel centres for both image (bilinear) and
# label (nearest-exact), so the two stay aligned.

_PNG_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error)


def _open_png(path: Path) -> Image.Image:
    im = None
    try:
        im = Image.open(path)
        im.load()
        return im
    except _PNG_ERRORS as exc:
        if im is not None:
            im.close()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: unreadable or corrupt PNG ({reason}); replace it with a good copy"
        ) from None


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a uint8 3×H×W tensor (a channels-last view of the decoded pixels)."""
    with _open_png(Path(path)) as im:
        rgb = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    return torch.from_numpy(rgb).permute(2, 0, 1)


def read_label(path: str | Path) -> np.ndarray:
    """A label file as a uint8 H×W array of train ids (labelIds mapped through the table), checked."""
    path = Path(path)
    with _open_png(path) as im:
        if im.mode not in ("L", "P"):
            raise UserError(
                f"{path}: a label must be a single-channel 8-bit id image, this one is {im.mode}; use the "
                f"*{_LABEL_ID_SUFFIX} (or *{_TRAIN_ID_SUFFIX}) files, not the colour ones"
            )
        ids = np.array(im)
    train_ids = path.name.endswith(_TRAIN_ID_SUFFIX)
    valid = VALID_TRAIN_IDS if train_ids else VALID_LABEL_IDS
    bad = ~valid[ids]
    if bad.any():
        values = np.unique(ids[bad])
        allowed = "0-18 and 255" if train_ids else "the Cityscapes label ids 0-33 (and 255)"
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise UserError(
            f"{path}: label values {shown} are not in the class table (allowed: {allowed}); "
            "regenerate the file from the annotations or remove the sample"
        )
    return ids if train_ids else ID_TO_TRAIN_ID[ids]


def resize_image(image: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 C×H×W → C×h×w, bilinear with antialiasing (no-op at the same size)."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image.contiguous()
    out = F.interpolate(image[None], size=size_hw, mode="bilinear", antialias=True, align_corners=False)[0]
    return out.contiguous()


def resize_label(label: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 H×W → h×w, nearest with half-pixel centres (the same grid as :func:`resize_image`)."""
    if tuple(label.shape[-2:]) == tuple(size_hw):
        return label
    return F.interpolate(label[None, None], size=size_hw, mode="nearest-exact")[0, 0]


def load_sample(
    sample: Sample, resize_hw: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one sample directly (no cache): uint8 image 3×H×W and train-id label H×W, optionally resized.

    This is what the cache stores, pixel for pixel."""
    image = read_image(sample.image)
    label = torch.from_numpy(read_label(sample.label))
    if tuple(image.shape[1:]) != tuple(label.shape):
        raise _size_mismatch(sample, tuple(image.shape[1:]), tuple(label.shape))
    if resize_hw is not None:
        image, label = resize_image(image, resize_hw), resize_label(label, resize_hw)
    return image.contiguous(), label


def _size_mismatch(sample: Sample, image_hw, label_hw) -> UserError:
    return UserError(
        f"{sample.label}: label is {label_hw[1]}x{label_hw[0]} but its image {sample.image.name} is "
        f"{image_hw[1]}x{image_hw[0]}; image and label must have the same size"
    )


def read_sizes(samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(H, W) of every label from the PNG headers, checked against its image: cheap, and it fails early."""
    sizes = []
    for s in samples:
        hw = []
        for path in (s.image, s.label):
            try:
                with Image.open(path) as im:
                    hw.append((im.height, im.width))
            except _PNG_ERRORS as exc:
                raise UserError(
                    f"{path}: unreadable or corrupt PNG ({exc}); replace it with a good copy"
                ) from None
        if hw[0] != hw[1]:
            raise _size_mismatch(s, hw[0], hw[1])
        sizes.append(hw[1])
    return sizes
