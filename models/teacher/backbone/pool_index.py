"""What the backbone teacher keeps of an unlabeled pool: a screening bank, per-image samples, descriptors.

Everything here is bounded independently of how much of the pool fits in memory at once:
- `screen_bank`: `screen_bank_size` patches drawn uniformly at random from the whole pool (rows sorted by
  image), with the row ranges each image contributed, so an image can be scored without its own patches;
- `samples[i]`: up to `patches_per_neighbour` random patches of image i (however large it is), float16:
  the rows its neighbours are scored against;
- `descriptors[i]`: a description of image i as a whole (the mean of its coarse patch features,
  features.py), which finds an image's nearest neighbours.

Uniform random samples, not a greedy coreset, on purpose: a coreset picks the most unusual patches first,
that is the defects, and a defect kept in a bank explains away the same defect elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from models.nearest import half_sq_norms, nearest_distances


@dataclass
class PoolIndex:
    """Bounded summaries of the pool's patch features (see the module docstring)."""

    keys: list[str]
    screen_bank: torch.Tensor  # (N_screen, D) float32
    screen_rows: dict[str, list[tuple[int, int]]]  # image key -> [start, end) rows of screen_bank
    samples: list[torch.Tensor]  # per image (S_i, D) float16
    descriptors: torch.Tensor  # (N, D_desc) float32
    screen_half_sq_norms: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.screen_half_sq_norms = half_sq_norms(self.screen_bank)


class PoolIndexBuilder:
    """Collects a `PoolIndex` while the pool's features stream past, one image at a time.

    Args:
        patch_counts: number of patches of every pool image, in order.
        keys: content key of every pool image (exact duplicates share one).
        samples_per_image: rows kept in `samples[i]` (at most the image's patch count).
        screen_bank_size: rows of the screening bank (at most the pool's patch count).
        seed: seeds both random draws.
    """

    def __init__(
        self,
        patch_counts: Sequence[int],
        keys: Sequence[str],
        samples_per_image: Sequence[int],
        screen_bank_size: int,
        seed: int,
    ):
        self._keys = list(keys)
        self._samples_per_image = list(samples_per_image)
        self._offsets = np.concatenate([[0], np.cumsum(patch_counts)]).astype(np.int64)
        self._generator = torch.Generator().manual_seed(seed)
        total = int(self._offsets[-1])
        chosen = torch.randperm(total, generator=self._generator)[: min(screen_bank_size, total)]
        self._chosen = chosen.sort().values.numpy()
        self._screen_parts: list[torch.Tensor] = []
        self._screen_rows: dict[str, list[tuple[int, int]]] = {}
        self._samples: list[torch.Tensor] = []
        self._descriptors: list[torch.Tensor] = []

    def add(
        self,
        index: int,
        patches: torch.Tensor,
        descriptor: torch.Tensor,
        fabric: tuple[int, int, int] | None = None,
    ) -> None:
        """Take what is kept of image `index` (images must come in order): (P_i, D) float32 patches, its
        (D_desc,) descriptor and, for an image with background beyond its fabric, the fabric's patch
        columns (first, last, columns of the grid): only patches on the fabric enter the banks."""
        if index != len(self._samples):
            raise ValueError(
                f"pool images must be added in order: expected {len(self._samples)}, got {index}"
            )
        on_fabric = torch.ones(patches.shape[0], dtype=torch.bool)
        if fabric is not None:
            first, last, columns = fabric
            column = torch.arange(patches.shape[0]) % columns
            on_fabric = (column >= first) & (column < last)
        lo, hi = np.searchsorted(self._chosen, self._offsets[index : index + 2])
        chosen = torch.from_numpy(self._chosen[lo:hi] - self._offsets[index])
        chosen = chosen[on_fabric[chosen]]
        start = sum(part.shape[0] for part in self._screen_parts)
        self._screen_parts.append(patches[chosen])
        # Exact duplicates share a key, so all their rows count as "own": a copy cannot vouch for its twin.
        self._screen_rows.setdefault(self._keys[index], []).append((start, start + len(chosen)))
        fabric_rows = torch.nonzero(on_fabric)[:, 0]
        keep = torch.randperm(len(fabric_rows), generator=self._generator)[: self._samples_per_image[index]]
        self._samples.append(patches[fabric_rows[keep.sort().values]].half())
        self._descriptors.append(descriptor)

    def build(self) -> PoolIndex:
        return PoolIndex(
            keys=self._keys,
            screen_bank=torch.cat(self._screen_parts).contiguous(),
            screen_rows=self._screen_rows,
            samples=self._samples,
            descriptors=torch.stack(self._descriptors),
        )


@torch.inference_mode()
def screen_scores(index: PoolIndex, patches: torch.Tensor, key: str, k: int) -> torch.Tensor:
    """(P, D) patches of one image -> (P,) mean distance to the k nearest screening-bank rows that did
    not come from this image (or an exact duplicate of it)."""
    bank = index.screen_bank
    own = index.screen_rows.get(key, [])
    k = max(1, min(k, bank.shape[0] - sum(end - start for start, end in own)))
    if not own:
        distances, _ = nearest_distances(patches, bank, k, index.screen_half_sq_norms)
        return distances.mean(dim=1)
    keep = torch.ones(bank.shape[0], dtype=torch.bool)
    for start, end in own:
        keep[start:end] = False
    if not keep.any():  # a pool of one image (and its copies): nothing to compare with
        return torch.zeros(patches.shape[0])
    distances, _ = nearest_distances(patches, bank[keep], k, index.screen_half_sq_norms[keep])
    return distances.mean(dim=1)


@torch.inference_mode()
def neighbour_scores(
    patches: torch.Tensor,
    descriptor: torch.Tensor,
    candidate_samples: Sequence[torch.Tensor],
    candidate_descriptors: torch.Tensor,
    num_neighbours: int,
    k: int,
) -> torch.Tensor:
    """Mean distance of each patch to its k nearest rows among the samples of the most similar images.

    Args:
        patches: (P, D) float32 patches of the image to score.
        descriptor: (D_desc,) its descriptor.
        candidate_samples: per candidate image (S_j, D) float16 rows (the image itself must not be one).
        candidate_descriptors: (C, D_desc) float32 descriptors of the candidates.
        num_neighbours: how many of the candidates (nearest by descriptor) form the bank.
        k: neighbours per patch.

    Returns:
        (P,) float32.
    """
    gaps = torch.cdist(descriptor[None], candidate_descriptors)[0]
    nearest = gaps.topk(min(num_neighbours, len(candidate_samples)), largest=False).indices
    bank = torch.cat([candidate_samples[int(j)] for j in nearest.sort().values]).float()
    distances, _ = nearest_distances(patches, bank, min(k, bank.shape[0]))
    return distances.mean(dim=1)
