"""Joint image + mask tensors, defect instances and the few-shot training crops.

A labeled image is cut into *instances*: the connected regions of one class (pixels of the same class
closer than a few pixels are one instance, so a hole's shards or a float's parallel yarns stay together).
Training crops are centred on an instance (with jitter), at full resolution, drawn class-balanced: a class
first (uniformly among the classes present), then one of its instances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from models.defect_gen.unets import IMAGE_CHANNELS

#: Pixels of one class closer than this are one instance.
MERGE_DISTANCE = 4
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Instance:
    """One defect: the labeled image it is in, its class (1..K), bounding box and pixel centre."""

    image: int
    class_id: int
    top: int
    left: int
    bottom: int
    right: int
    pixels: int
    components: int

    @property
    def center(self) -> tuple[int, int]:
        return (self.top + self.bottom) // 2, (self.left + self.right) // 2

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


def instance_labels(mask: np.ndarray, class_id: int) -> tuple[np.ndarray, int]:
    """Label image of the instances of ``class_id`` in ``mask`` (0 = none) and their number."""
    region = mask == class_id
    if not region.any():
        return np.zeros(mask.shape, dtype=np.int32), 0
    grown = ndimage.binary_dilation(region, _EIGHT, iterations=MERGE_DISTANCE // 2)
    labels, count = ndimage.label(grown, _EIGHT)
    return np.where(region, labels, 0).astype(np.int32), int(count)


def find_instances(masks: Sequence[np.ndarray], num_classes: int) -> list[Instance]:
    """Every instance of every class 1..num_classes in ``masks`` (values above that are ignored)."""
    found = []
    for index, mask in enumerate(masks):
        for class_id in range(1, num_classes + 1):
            labels, count = instance_labels(mask, class_id)
            for label, box in enumerate(ndimage.find_objects(labels, count), start=1):
                if box is None:
                    continue
                own = labels[box] == label
                components = ndimage.label(own, _EIGHT)[1]
                found.append(
                    Instance(
                        image=index,
                        class_id=class_id,
                        top=box[0].start,
                        left=box[1].start,
                        bottom=box[0].stop,
                        right=box[1].stop,
                        pixels=int(own.sum()),
                        components=int(components),
                    )
                )
    return found


def count_components(mask: np.ndarray) -> int:
    """Connected regions (8-connected) of defect pixels in a class mask."""
    return int(ndimage.label(mask > 0, _EIGHT)[1])


def encode(image: np.ndarray, mask: np.ndarray, num_classes: int) -> torch.Tensor:
    """(H, W, 3) uint8 + (H, W) class mask -> (3 + K + 1, H, W) float32 in [-1, 1]."""
    rgb = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    labels = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)).clamp_(0, num_classes)
    one_hot = F.one_hot(labels, num_classes + 1).permute(2, 0, 1).float() * 2.0 - 1.0
    return torch.cat([rgb, one_hot], dim=0)


def decode(sample: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(3 + K + 1, H, W) in [-1, 1] -> (H, W, 3) uint8 image, (H, W) uint8 argmax class mask."""
    rgb = ((sample[:IMAGE_CHANNELS].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    mask = sample[IMAGE_CHANNELS:].float().argmax(dim=0).to(torch.uint8)
    return rgb.permute(1, 2, 0).cpu().numpy(), mask.cpu().numpy()


def background_channels(num_classes: int, height: int, width: int) -> torch.Tensor:
    """Mask channels that say "background" everywhere: +1 in channel 0, -1 in the class channels."""
    channels = -torch.ones(num_classes + 1, height, width)
    channels[0] = 1.0
    return channels


def crop_at(array: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """A size x size crop with top-left (top, left); parts outside the array are mirrored in."""
    height, width = array.shape[:2]
    pad_top, pad_left = max(0, -top), max(0, -left)
    pad_bottom, pad_right = max(0, top + size - height), max(0, left + size - width)
    if pad_top or pad_left or pad_bottom or pad_right:
        pads = ((pad_top, pad_bottom), (pad_left, pad_right)) + ((0, 0),) * (array.ndim - 2)
        array = np.pad(array, pads, mode="symmetric")
        top, left = top + pad_top, left + pad_left
    return array[top : top + size, left : left + size]


class DefectCrops:
    """Class-balanced, augmented joint crops around the instances of a few labeled images.

    Each instance's neighbourhood (the crop plus a jitter margin) is encoded once and kept as one tensor on
    the training device; a batch is drawn there: class uniformly among the classes present, then one of its
    instances, a random shift of up to a quarter of the margin's side, one of the eight flips/quarter turns
    and a small colour jitter (gain and offset of the RGB channels).

    Args:
        images: (H, W, 3) uint8 RGB labeled images.
        masks: (H, W) uint8 class masks (0 = background, k = class k).
        num_classes: K, the project's classes.
        crop_size: side of the crops at full resolution.
        jitter: colour jitter amplitude (gain and offset in [-1, 1] units).
        device: where the crops live and batches are made.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        num_classes: int,
        crop_size: int,
        jitter: float = 0.05,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask {i} has shape {mask.shape}, its image {image.shape[:2]}")
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.margin = crop_size // 8
        self.jitter = jitter
        self.instances = find_instances(list(masks), num_classes)
        if not self.instances:
            raise ValueError("no labeled defect in the training images: Defect-Gen needs defect masks")
        side = crop_size + 2 * self.margin
        bank = []
        for instance in self.instances:
            cy, cx = instance.center
            top, left = cy - side // 2, cx - side // 2
            image = crop_at(images[instance.image], top, left, side)
            mask = crop_at(masks[instance.image], top, left, side)
            bank.append(encode(image, mask, num_classes))
        self.bank = torch.stack(bank).to(device)
        self.labels = torch.tensor([i.class_id for i in self.instances], device=device)
        self.classes = sorted({i.class_id for i in self.instances})
        self.by_class = {
            c: torch.tensor([k for k, i in enumerate(self.instances) if i.class_id == c], device=device)
            for c in self.classes
        }
        self.device = torch.device(device)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` augmented crops (B, C, S, S) on the device and their class labels (B,).

        ``generator`` is a CPU generator: the draws do not depend on the device.
        """
        class_pick = torch.randint(len(self.classes), (size,), generator=generator).tolist()
        index = []
        for c in class_pick:
            pool = self.by_class[self.classes[c]]
            index.append(int(pool[int(torch.randint(len(pool), (), generator=generator))]))
        offsets = torch.randint(2 * self.margin + 1, (size, 2), generator=generator).tolist()
        s = self.crop_size
        x = torch.stack(
            [self.bank[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in zip(index, offsets, strict=True)]
        )
        turns = torch.randint(8, (size,), generator=generator)
        out = torch.empty_like(x)
        for code in range(8):
            chosen = (turns == code).nonzero().flatten().to(x.device)
            if len(chosen) == 0:
                continue
            part = torch.rot90(x[chosen], code % 4, (2, 3))
            out[chosen] = part.flip(3) if code >= 4 else part
        if self.jitter:
            gain = 1.0 + (torch.rand(size, 1, 1, 1, generator=generator) * 2 - 1) * self.jitter
            shift = (torch.rand(size, 1, 1, 1, generator=generator) * 2 - 1) * self.jitter
            rgb = out[:, :IMAGE_CHANNELS]
            out[:, :IMAGE_CHANNELS] = ((rgb + 1) * gain.to(x.device) - 1 + shift.to(x.device)).clamp(-1, 1)
        return out, self.labels[torch.tensor(index, device=self.device)]


def random_patches(x: torch.Tensor, patch: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``patch`` x ``patch`` window of each crop of (B, C, S, S) (CPU generator)."""
    size = x.shape[-1]
    corners = torch.randint(size - patch + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack(
        [
            sample[:, top : top + patch, left : left + patch]
            for sample, (top, left) in zip(x, corners, strict=True)
        ]
    )
