"""Fine-texture energy: the pixel-scale cue that the teacher's CNN features average away.

Speckle, lint, pin-holes and loose fibre ends change fabric at the scale of single pixels. The teacher's
finest Lite0 level (stride 2) is average-pooled to the stride-8 patch grid, where such noise largely
cancels (pooling it by its maximum or RMS instead does not help). The local energy of the image's
Laplacian, a classic texture-energy measure, keeps it. Alone it is a poor defect map on fabric (weaves
differ in fine texture, most defects are not pixel-scale), so the teacher lets it in only where it stands
far above the pool's typical level (torch_model.py). Measurements in BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import laplace, uniform_filter

#: Side of the square window the squared Laplacian is averaged over: about one speckle.
TEXTURE_WINDOW = 9


def texture_energy(image: np.ndarray, window: int = TEXTURE_WINDOW) -> np.ndarray:
    """(H, W, 3) uint8 image -> (H, W) float32 fine-texture energy relative to the image's own level.

    log(1 + local mean of the squared Laplacian of the grey image) minus its median over the image, so a
    sharper or noisier camera (or fabric) as a whole is not singled out, only the places where the fine
    texture is stronger than elsewhere in the same image.
    """
    # the channels' mean as float32 `mean` sums them, without a float copy of the whole image
    grey = (image[..., 0].astype(np.float32) + image[..., 1] + image[..., 2]) / np.float32(3)
    energy = np.log1p(uniform_filter(laplace(grey) ** 2, size=window, mode="reflect"))
    return (energy - np.median(energy)).astype(np.float32)
