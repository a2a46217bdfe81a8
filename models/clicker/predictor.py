"""Click-to-mask inference over full images: zoom-in crop, cached backbone features, paste-back.

Follow-up clicks on the same image keep the previous call's crop while the clicks and the region of
interest stay inside it, so they hit the cache and only the light decoder runs. The cache is an LRU of
backbone features keyed by (image key, crop); a lock guards it and the per-image crop memory, as an HTTP
server may call ``predict`` from several threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.backbone.efficientnet_lite import normalize
from models.clicker.clicks import Click, disk_maps
from models.clicker.noc import Segmenter
from models.clicker.torch_model import ClickSegmenter, ImageFeatures, fuse_for_inference
from models.clicker.zoom import Crop, crop_image, crop_mask, near_components, paste, roi_crop, uncrop

#: A click closer than this share of the crop side to its edge makes the predictor re-crop.
KEEP_MARGIN = 0.1
#: Images whose last crop is remembered (for keeping the crop across follow-up clicks).
REMEMBERED_IMAGES = 64


@dataclass(frozen=True)
class ClickAnswer:
    """One answer of the click segmenter.

    mask: (H, W) bool, the full-image mask (the previous mask outside the crop, the answer inside).
    score: in [0, 1], the mean foreground probability inside the answer within the crop (0 when empty).
    box: (top, left, bottom, right) in image pixels, the crop's part inside the image.
    encoded: True when the backbone ran for this call, False when cached features served it.
    """

    mask: np.ndarray
    score: float
    box: tuple[int, int, int, int]
    encoded: bool


def image_digest(image: np.ndarray) -> str:
    """A content key for an image array (shape and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def clicked_pixels_obey(mask: np.ndarray, clicks: Sequence[Click]) -> np.ndarray:
    """Give each clicked pixel its click's label, in click order (a later click on a pixel wins).

    A click is the annotator's statement about that pixel; when the network's answer contradicts it
    (a thin yarn it does not grow into), the next click would land on the same spot again. Only the one
    pixel under each click is set, so a wrong network answer around it stays visible to fix.

    Args:
        mask: (H, W) bool, modified in place and returned.
        clicks: image-coordinate clicks (pixel centres at integer coordinates).
    """
    height, width = mask.shape
    for click in clicks:
        y, x = round(click.y), round(click.x)
        if 0 <= y < height and 0 <= x < width:
            mask[y, x] = click.is_positive
    return mask


class ClickPredictor:
    """Turns clicks (and a previous mask) on a full image into a full-image mask.

    Args:
        model: a trained :class:`ClickSegmenter` (its config sets crop side, zoom, disk radius, threshold).
        cache_size: (image, crop) feature sets kept (each ~1.5 MB at S = 256 for Lite0).
        fuse: fold batch norms into convolutions for inference (same outputs, faster).
        device: where to run (default: the model's device).
    """

    def __init__(
        self,
        model: ClickSegmenter,
        cache_size: int = 16,
        fuse: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        model = model.eval()
        self.config = model.config
        self.model = (fuse_for_inference(model) if fuse else model).eval()
        if device is not None:
            self.model.to(device)
        self.model.to(memory_format=torch.channels_last)
        self.device = next(self.model.parameters()).device
        self.cache_size = cache_size
        self._features: OrderedDict[tuple[str, Crop], ImageFeatures] = OrderedDict()
        self._last_crop: OrderedDict[str, Crop] = OrderedDict()
        self._lock = threading.Lock()
        self.encode_calls = 0  # backbone runs so far (tests and monitoring)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: object) -> ClickPredictor:
        """A predictor over a model folder saved by ``ClickSegmenter.save_pretrained``."""
        return cls(ClickSegmenter.from_pretrained(directory), **kwargs)  # type: ignore[arg-type]

    # ---- crops and cache ---------------------------------------------------------------------------

    def choose_crop(
        self, key: str, clicks: Sequence[Click], prev_mask: np.ndarray | None, shape: tuple[int, int]
    ) -> Crop:
        """The previous call's crop while clicks and region of interest fit well inside it, else a new one."""
        fresh = roi_crop(clicks, prev_mask, shape, self.config.zoom)
        with self._lock:
            last = self._last_crop.get(key)
        if last is None or (last.height, last.width) != tuple(shape):
            return fresh
        margin = KEEP_MARGIN * last.side
        if not all(last.contains(c.y, c.x, margin) for c in clicks):
            return fresh
        if prev_mask is not None:
            region = near_components(prev_mask, clicks, self.config.near)
            rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
            if rows.size and not (last.contains(rows[0], cols[0]) and last.contains(rows[-1], cols[-1])):
                return fresh
        return last

    def _encode(self, key: str, crop: Crop, image: np.ndarray) -> tuple[ImageFeatures, bool]:
        with self._lock:
            cached = self._features.get((key, crop))
            if cached is not None:
                self._features.move_to_end((key, crop))
                return cached, False
        x = normalize(crop_image(image, crop, self.config.image_size)).to(self.device)
        features = self.model.encode_image(x.contiguous(memory_format=torch.channels_last))
        with self._lock:
            self.encode_calls += 1
            self._features[(key, crop)] = features
            while len(self._features) > self.cache_size:
                self._features.popitem(last=False)
        return features, True

    def clear_cache(self) -> None:
        with self._lock:
            self._features.clear()
            self._last_crop.clear()

    # ---- prediction --------------------------------------------------------------------------------

    def probabilities(
        self, image: np.ndarray, clicks: Sequence[Click], prev_mask: np.ndarray | None, crop: Crop, key: str
    ) -> tuple[np.ndarray, bool]:
        """(S, S) foreground probabilities of the crop, and whether the backbone ran."""
        size = self.config.image_size
        features, encoded = self._encode(key, crop, image)
        local = [crop.to_crop(c, size) for c in clicks]
        prev = np.zeros((size, size), np.float32) if prev_mask is None else crop_mask(prev_mask, crop, size)
        aux = np.concatenate([disk_maps(local, (size, size), self.config.click_radius), prev[None]])
        aux_t = torch.from_numpy(aux)[None].to(self.device).contiguous(memory_format=torch.channels_last)
        logits = self.model.decode(features, aux_t)
        return torch.sigmoid(logits)[0, 0].float().cpu().numpy(), encoded

    def predict(
        self,
        image: np.ndarray,
        clicks: Sequence[Click],
        prev_mask: np.ndarray | None = None,
        image_key: str | None = None,
    ) -> ClickAnswer:
        """The mask for these clicks.

        Args:
            image: (H, W, 3) uint8 RGB, any size (a 4096 x 256 frame costs what a 256 x 256 crop costs).
            clicks: all clicks on this object so far (at least one), full-image pixel coordinates.
            prev_mask: (H, W) bool, the mask to correct (pre-annotation or the last answer), or None.
            image_key: a stable id of the image (e.g. the task id); default: a digest of its pixels.

        Returns:
            A :class:`ClickAnswer`.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if not clicks:
            raise ValueError("predict needs at least one click")
        shape = (image.shape[0], image.shape[1])
        if prev_mask is not None:
            if prev_mask.shape != shape:
                raise ValueError(f"prev_mask {prev_mask.shape} does not match image {shape}")
            prev_mask = prev_mask.astype(bool, copy=False)
        key = image_key if image_key is not None else image_digest(image)
        crop = self.choose_crop(key, clicks, prev_mask, shape)
        with torch.inference_mode():
            probs, encoded = self.probabilities(image, clicks, prev_mask, crop, key)
        with self._lock:
            self._last_crop[key] = crop
            self._last_crop.move_to_end(key)
            while len(self._last_crop) > REMEMBERED_IMAGES:
                self._last_crop.popitem(last=False)
        threshold = self.config.threshold
        mask = clicked_pixels_obey(paste(probs, crop, prev_mask, threshold), clicks)
        inside = uncrop(probs, crop)
        fg = inside[inside >= threshold]
        score = float(fg.mean()) if fg.size else 0.0
        return ClickAnswer(mask=mask, score=score, box=crop.box, encoded=encoded)

    def segmenter(self) -> Segmenter:
        """``segment(image, clicks, prev_mask) -> (H, W) bool`` over this predictor (for the NoC protocol)."""

        def segment(image: np.ndarray, clicks: Sequence[Click], prev_mask: np.ndarray | None) -> np.ndarray:
            return self.predict(image, clicks, prev_mask).mask

        return segment
