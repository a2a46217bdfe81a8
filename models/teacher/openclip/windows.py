"""Window embeddings by token masking, and the harmonic aggregation of window scores onto patches.

A CLIP ViT sees an image as a class token plus a grid of patch tokens. A *window* of k x k neighbouring
patches gets its own embedding by running the transformer on the class token and only that window's
patch tokens (token masking, as in WinCLIP): the window sees nothing outside itself, its receptive field
is exactly its patches, and no pixels are cropped or resized. All windows of all tiles share one patch
embedding (the conv stem runs once per tile) and run as a few batched transformer calls over gathered
token subsets, not one forward per window.

Cost. For ViT-B-16-plus-240 (15 x 15 patches) the 2 x 2 and 3 x 3 windows at stride 1 are 196 x 5 + 169 x 10
= 2,670 tokens against 226 for the whole image: the linear layers (which dominate at these lengths) do
~12x the work of one plain image pass; attention is cheap for 5-10 tokens. Two exact savings apply: the
last block computes only each window's class token (the patch tokens' outputs are never used, so they only
feed keys and values), and `window_layers` may share the first blocks with the whole-image pass (an
approximation: windows then carry context from outside them; None = exact token masking in every block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from models.tiling import tile_starts


def window_indices(grid: tuple[int, int], size: int, stride: int = 1) -> torch.Tensor:
    """Patch indices of every `size` x `size` window over a (rows, cols) patch grid.

    Windows start every `stride` patches; the last row/column of windows is aligned to the grid's end, so
    every patch is covered even when the stride does not divide the grid.

    Returns:
        (num_windows, size * size) int64 row-major patch indices (row * cols + col), windows row-major.
    """
    rows, cols = grid
    if not 1 <= size <= min(rows, cols):
        raise ValueError(f"window size {size} must be in [1, {min(rows, cols)}] for a {rows} x {cols} grid")
    if not 1 <= stride <= size:
        raise ValueError(f"window stride {stride} must be in [1, size={size}] so that windows cover the grid")
    offsets = (torch.arange(size)[:, None] * cols + torch.arange(size)[None, :]).flatten()
    starts = [
        top * cols + left
        for top in tile_starts(rows, size, size - stride)
        for left in tile_starts(cols, size, size - stride)
    ]
    return torch.tensor(starts)[:, None] + offsets[None, :]


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows that cover it.

    The harmonic mean follows the lowest scores: a patch is called anomalous only when every window that
    contains it is, which keeps a defect from bleeding into the normal patches its windows also cover.

    Args:
        window_scores: (B, W, *extra) positive scores per window (e.g. probabilities; extra dims such as
            classes are aggregated independently).
        windows: (W, K) patch indices of each window (`window_indices`).
        num_patches: patches in the grid; each must be covered by at least one window.

    Returns:
        (B, num_patches, *extra) float32.
    """
    counts = torch.bincount(windows.flatten(), minlength=num_patches)
    if counts.numel() != num_patches or bool((counts == 0).any()):
        raise ValueError(f"the windows must cover every one of the {num_patches} patches and no other index")
    inverse = 1.0 / window_scores.float().clamp_min(1e-12)
    per_member = inverse.repeat_interleave(windows.shape[1], dim=1)  # (B, W * K, *extra)
    sums = torch.zeros(window_scores.shape[0], num_patches, *window_scores.shape[2:], dtype=torch.float32)
    sums.index_add_(1, windows.flatten(), per_member)
    return counts.view(1, -1, *([1] * (window_scores.dim() - 2))).float() / sums


@dataclass
class TileEmbeddings:
    """L2-normalised embeddings of a batch of T tiles, in the joint image-text space (E dims).

    image: (T, E) the whole tile (class token of the full pass);
    patches: (T, P, E) the full pass's patch tokens, projected (used as few-shot memory, not with text);
    windows: one (T, W_s, E) per window scale.
    """

    image: torch.Tensor
    patches: torch.Tensor
    windows: list[torch.Tensor]


def _class_token_block(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """One transformer block computed for the class token only: (N, L, D) -> (N, 1, D).

    The class token attends to all L tokens, so every token still needs its keys and values, but the
    attention output, the MLP and the residuals are needed for the class token alone.
    """
    if type(block) is not ResidualAttentionBlock:  # other block kinds: run whole, keep the class token
        return block(tokens)[:, :1]
    normed = block.ln_1(tokens)
    cls = tokens[:, :1] + block.ls_1(block.attention(q_x=normed[:, :1], k_x=normed, v_x=normed))
    return cls + block.ls_2(block.mlp(block.ln_2(cls)))


def check_visual(visual: nn.Module) -> VisionTransformer:
    """The image tower, if it is a ViT with a class token (token masking needs one); else ValueError."""
    if (
        not isinstance(visual, VisionTransformer)
        or visual.pool_type != "tok"
        or visual.attn_pool is not None
        or not visual.transformer.batch_first
    ):
        raise ValueError(
            f"the image tower {type(visual).__name__} is not a class-token ViT: window embeddings by "
            "token masking need an open_clip ViT model (e.g. ViT-B-16-plus-240, ViT-B-16, ViT-L-14)"
        )
    return visual


class WindowEncoder(nn.Module):
    """Whole-tile, patch and token-masked window embeddings of a CLIP ViT (see the module docstring)."""

    def __init__(
        self,
        visual: nn.Module,
        window_sizes: tuple[int, ...] = (2, 3),
        stride: int = 1,
        window_layers: int | None = None,
        max_windows_per_call: int = 2048,
    ):
        super().__init__()
        self.visual = check_visual(visual)
        self.grid: tuple[int, int] = tuple(self.visual.grid_size)  # type: ignore[assignment]
        self.windows = [window_indices(self.grid, size, stride) for size in window_sizes]
        depth = len(self.visual.transformer.resblocks)
        if window_layers is not None and not 1 <= window_layers <= depth:
            raise ValueError(f"window_layers must be None or in [1, {depth}], got {window_layers}")
        # Blocks before `shared_depth` run once on the whole tile; the rest run per window.
        self.shared_depth = 0 if window_layers is None else depth - window_layers
        self.max_windows_per_call = max_windows_per_call

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) final-block tokens -> (..., E) L2-normalised joint-space embeddings."""
        return nn.functional.normalize(self.visual.ln_post(tokens) @ self.visual.proj, dim=-1)

    def window_embeddings(self, shared: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Embed every window of every tile by token masking.

        Args:
            shared: (T, 1 + P, D) token states entering block `shared_depth` (class token first).
            windows: (W, K) patch indices of one window scale.

        Returns:
            (T, W, E) L2-normalised window embeddings.
        """
        tiles = shared.shape[0]
        class_then_window = torch.cat([torch.zeros(len(windows), 1, dtype=torch.long), windows + 1], dim=1)
        gathered = shared[:, class_then_window].flatten(0, 1)  # (T * W, 1 + K, D)
        blocks = self.visual.transformer.resblocks[self.shared_depth :]
        outputs = []
        for chunk in gathered.split(self.max_windows_per_call):
            for block in blocks[:-1]:
                chunk = block(chunk)
            outputs.append(_class_token_block(blocks[-1], chunk)[:, 0])
        return self._project(torch.cat(outputs)).view(tiles, len(windows), -1)

    def forward(self, pixels: torch.Tensor) -> TileEmbeddings:
        """(T, 3, S, S) normalised tiles at the model's input size -> their `TileEmbeddings`."""
        tokens = self.visual._embeds(pixels)  # conv stem + class token + positions + ln_pre, (T, 1 + P, D)
        blocks = self.visual.transformer.resblocks
        for block in blocks[: self.shared_depth]:
            tokens = block(tokens)
        shared = tokens
        for block in blocks[self.shared_depth :]:
            tokens = block(tokens)
        projected = self._project(tokens)
        windows = [self.window_embeddings(shared, indices) for indices in self.windows]
        return TileEmbeddings(image=projected[:, 0], patches=projected[:, 1:], windows=windows)
