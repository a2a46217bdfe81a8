"""Image embeddings for diversity-aware review selection (loom/stages/selection.py).

One vector per image from the frozen ImageNet EfficientNet-Lite0 patch features (strides 8 and 16, the
region descriptors' levels): the mean over patches says which fabric it is, the max over patches keeps
what stands out of it (a defect), so two images of the same cloth with different defects stay apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.backbone.efficientnet_lite import load_pretrained_lite0, normalize
from models.teacher.backbone.features import PatchFeatureExtractor


@lru_cache(maxsize=1)
def _extractor() -> PatchFeatureExtractor:
    return PatchFeatureExtractor(load_pretrained_lite0(True)).eval()


@torch.inference_mode()
def image_embeddings(images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """(N, 2 D) float32 L2-normalised embeddings of (H, W, 3) uint8 images (sizes may differ)."""
    extractor = _extractor()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        # Same-sized images go through the network together; a chunk of mixed sizes one by one.
        groups = [np.stack(chunk)] if len({im.shape for im in chunk}) == 1 else [im[None] for im in chunk]
        for group in groups:
            patches = extractor(normalize(np.ascontiguousarray(group))).flatten(2)  # (B, D, P)
            vectors = torch.cat([patches.mean(dim=2), patches.amax(dim=2)], dim=1)
            out.extend(F.normalize(vectors, dim=1).numpy())
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 2 * extractor.dim), np.float32)


def cached_embeddings(cache: Path, image_ids: Sequence[str], load: Callable[[str], np.ndarray]) -> np.ndarray:
    """(N, 2 D) embeddings of ``image_ids``, computing (with ``load(image_id)``) only those not in ``cache``.

    The cache is an ``.npz`` of ids and vectors keyed by the image's content hash (the manifest's image id),
    so an image is embedded once however many rounds it stays in the pool.
    """
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache) as stored:
            known = dict(zip(stored["ids"].tolist(), stored["vectors"], strict=True))
    missing = [image_id for image_id in image_ids if image_id not in known]
    if missing:
        known.update(zip(missing, image_embeddings([load(image_id) for image_id in missing]), strict=True))
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(".tmp.npz")
        np.savez(staging, ids=np.array(list(known)), vectors=np.stack(list(known.values())))
        staging.replace(cache)
    if not image_ids:
        return np.zeros((0, 2 * _extractor().dim), np.float32)
    return np.stack([known[image_id] for image_id in image_ids])
