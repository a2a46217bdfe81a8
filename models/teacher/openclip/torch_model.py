"""Vision-language teacher: WinCLIP-style zero-/few-shot anomaly maps and defect classes from open_clip.

Language score (zero-shot). Text embeddings of the prompt ensembles (prompts.py) are averaged per state
(normal, anomalous) and per defect class and L2-normalised. Every window embedding (windows.py: 2 x 2 and
3 x 3 patch windows at stride 1, by token masking) gets an anomaly probability, the softmax over its
similarity to (normal, anomalous) with CLIP's own logit scale. Window probabilities are aggregated onto the
patch grid by the harmonic mean over the windows covering each patch, per scale; the scales are averaged.

Visual score (few-shot, WinCLIP+). `fit(pool, normals)` keeps the window embeddings of each scale and the
patch embeddings of the k normal images as a memory; a test window scores 0.5 x (1 - max cosine to the
memory of its scale), aggregated like the language score; patches score against the patch memory; the
scales are averaged. With normals, the map is the mean of the language and the visual map (both lie in
[0, 1]), as in WinCLIP+: the references say what this fabric looks like, the prompts what a defect is.

Defect classes. Each class has its own prompt ensemble; per window a softmax over the class embeddings,
aggregated per class like the maps and renormalised per patch: `class_probs` (C, H, W).

Image score = 0.5 x (anomaly probability of the whole-tile embedding + maximum of the map). The global
embedding sees texture-wide faults; the map maximum sees a small defect the global embedding averages away.
Both lie in [0, 1]. A tiled image takes the maximum global probability over its tiles.

Thresholds, from data (no labels):
- with >= 2 normals: every normal is scored against the memory of the *other* normals (leave-one-out: scored
  against itself it would read 0); `pixel_threshold` = max of those normal pixel scores + `normal_margin_mads`
  MAD-sigma of them, `image_threshold` likewise from the normals' image scores (MAD-sigma of the pool's image
  scores). Leave-one-out runs with one reference fewer than the pool gets, so it errs on the high side.
- otherwise (zero-shot, or a single normal): robust statistics of the pool, as the backbone teacher:
  median + `threshold_mads` (pixels) / `image_threshold_mads` (images) MAD-sigma. Neither cut has been tuned
  on real CLIP weights (none are reachable offline): measure them on your data.
- mask = map >= pixel_threshold, on images whose score reaches `image_threshold` (an image called normal
  gets an empty mask, so labels and masks never contradict); uncertainty = exp(-0.5 ((score - image_threshold)
  / sigma)^2), sigma the MAD-sigma of the pool's image scores.

Large images are cut into `tile_size` tiles overlapping by `tile_overlap` (models/tiling.py); each tile is
resized to the model's input, and the per-tile maps are stitched at input resolution (never squashed whole).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from models.progress import track
from models.robust_stats import median_and_sigma
from models.teacher.openclip.prompts import class_prompts, state_prompts
from models.teacher.openclip.weights import load_clip
from models.teacher.openclip.windows import TileEmbeddings, WindowEncoder, harmonic_aggregate
from models.teacher.types import TeacherPrediction
from models.tiling import stitch_tiles, tile_origins

logger = logging.getLogger(__name__)

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("hole", "stain", "broken_yarn", "knot", "misweave")
_MAX_PIXEL_SAMPLES = 1_000_000


@dataclass
class OpenClipTeacherConfig:
    """Settings of the open_clip teacher (see the module docstring for what each one does).

    Weights: `checkpoint` (a local open_clip checkpoint file) wins over `pretrained` (an open_clip tag,
    downloaded into the cache on a machine that can reach the hub); both None = random weights, for tests
    and cost measurements only. `tile_size` is in input pixels: an image up to that size on both sides is
    resized whole to the model's input (the default fits the project's 256-pixel images to a 240 input).
    `window_layers`: None = exact token masking in every block (on ViT-B-16-plus-240, 2,670 window tokens
    against 226 for the image); k = the first blocks run once on the whole image and only the last k
    blocks run per window, each window's class token attending to that window's patch tokens alone. The
    default 1 is what makes the VLM teacher affordable on a CPU line (cost of both in BENCHMARKS.md, "The
    open_clip teacher: cost per image"); windows then carry some context from the earlier, shared blocks.
    Set None for the exact method when a GPU makes the cost irrelevant.
    """

    model_name: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e32"
    checkpoint: str | None = None
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    window_sizes: tuple[int, ...] = (2, 3)
    window_stride: int = 1
    window_layers: int | None = 1
    tile_size: int = 256
    tile_overlap: int = 32
    tiles_per_batch: int = 8
    threshold_mads: float = 6.0
    image_threshold_mads: float = 3.0
    normal_margin_mads: float = 1.0
    device: str = "cpu"
    seed: int = 0


@dataclass
class _TileScores:
    """Patch-grid scores of an image's tiles: grids (T, 1 + C, gh, gw) = anomaly map then class
    probabilities; global_probs (T,) the whole-tile anomaly probabilities."""

    grids: torch.Tensor
    global_probs: torch.Tensor


def _image_key(image: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(str(image.shape).encode())
    return digest.hexdigest()


def _check_images(images: Sequence[np.ndarray], what: str) -> None:
    for index, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
            raise ValueError(f"{what} image {index} must be an (H, W, 3) uint8 array, got {type(image)}")
        if image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"{what} image {index} must be an (H, W, 3) uint8 array, got {image.shape}")


@torch.inference_mode()
def encode_prompt_ensembles(
    model: torch.nn.Module, tokenizer, ensembles: Sequence[Sequence[str]], device: str = "cpu"
) -> torch.Tensor:
    """(N, E) L2-normalised mean text embedding of each prompt ensemble.

    CLIP's text tower is causal and pools at the end-of-text token, so tokens after the longest prompt
    cannot change any output: the sequence is cut there (~15 instead of 77 tokens, the same embeddings).
    """
    prompts = [prompt for ensemble in ensembles for prompt in ensemble]
    tokens = tokenizer(prompts).to(device)
    trimmable = (
        isinstance(model, open_clip.CLIP) and model.text_pool_type == "argmax" and model.attn_mask is not None
    )
    if trimmable:
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]
        x = model.token_embedding(tokens) + model.positional_embedding[:length]
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = open_clip.transformer.text_global_pool(x, tokens, "argmax")
        projection = model.text_projection
        if isinstance(projection, torch.nn.Linear):
            embeddings = projection(x)
        else:
            embeddings = x if projection is None else x @ projection
    else:
        embeddings = model.encode_text(tokens)
    embeddings = F.normalize(embeddings.float(), dim=-1)
    means = [chunk.mean(dim=0) for chunk in embeddings.split([len(e) for e in ensembles])]
    return F.normalize(torch.stack(means), dim=-1)


class OpenClipTeacher:
    """WinCLIP-style zero-/few-shot teacher on open_clip (see the module docstring).

    Usage: `teacher.fit(pool, normals)` then `teacher.predict(images)`. The model loads in the constructor
    (OpenClipWeightsUnavailable when its weights are not on this machine).
    """

    name = "openclip"

    def __init__(self, config: OpenClipTeacherConfig | None = None):
        self.config = config or OpenClipTeacherConfig()
        if not 0 <= self.config.tile_overlap < self.config.tile_size:
            raise ValueError(f"need 0 <= tile_overlap < tile_size, got {self.config}")
        self.class_names: tuple[str, ...] = tuple(self.config.class_names)
        self.pixel_threshold: float | None = None
        self.image_threshold: float | None = None
        self._score_sigma: float | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # random weights (no checkpoint, no tag) follow the seed
            self.model = load_clip(self.config).to(self.config.device).eval().requires_grad_(False)
        self.encoder = WindowEncoder(
            self.model.visual, self.config.window_sizes, self.config.window_stride, self.config.window_layers
        )
        preprocess = getattr(self.model.visual, "preprocess_cfg", {})
        self._mean = torch.tensor(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
        self.input_size: tuple[int, int] = tuple(self.model.visual.image_size)  # type: ignore[assignment]
        tokenizer = open_clip.get_tokenizer(self.config.model_name)
        states = state_prompts()
        self._logit_scale = float(self.model.logit_scale.exp())
        # Text embeddings live on the CPU, where the (cheap) scoring runs: (2, E) normal/anomalous, (C, E).
        self._state_text = encode_prompt_ensembles(
            self.model, tokenizer, [states["normal"], states["anomalous"]], self.config.device
        ).cpu()
        ensembles = list(class_prompts(self.class_names).values())
        self._class_text = (
            encode_prompt_ensembles(self.model, tokenizer, ensembles, self.config.device).cpu()
            if ensembles
            else None
        )
        self._memory: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per scale: (M, E), owners (M,)
        self._cache: dict[str, _TileScores] = {}

    # ---------------------------------------------------------------- embeddings
    def _tile_layout(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """Tile shape and (top, left) origins covering an image (one tile when it fits `tile_size`)."""
        tile = (min(self.config.tile_size, height), min(self.config.tile_size, width))
        return tile, tile_origins(height, width, tile, self.config.tile_overlap)

    def _pixels(self, crops: np.ndarray) -> torch.Tensor:
        """(T, h, w, 3) uint8 -> (T, 3, S, S) normalised model input (bicubic, as CLIP's preprocessing)."""
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(255.0)
        pixels = F.interpolate(pixels, self.input_size, mode="bicubic", antialias=True, align_corners=False)
        return ((pixels.clamp_(0.0, 1.0) - self._mean) / self._std).to(self.config.device)

    @torch.inference_mode()
    def _embed(self, image: np.ndarray) -> TileEmbeddings:
        """Embeddings of all tiles of one (H, W, 3) uint8 image, tiles in `_tile_layout` order."""
        (tile_h, tile_w), origins = self._tile_layout(*image.shape[:2])
        crops = np.stack([image[top : top + tile_h, left : left + tile_w] for top, left in origins])
        batches = max(1, math.ceil(len(crops) / self.config.tiles_per_batch))
        parts = [self.encoder(self._pixels(batch)) for batch in np.array_split(crops, batches)]
        scales = range(len(self.encoder.windows))
        return TileEmbeddings(
            image=torch.cat([part.image for part in parts]).cpu(),
            patches=torch.cat([part.patches for part in parts]).cpu(),
            windows=[torch.cat([part.windows[scale] for part in parts]).cpu() for scale in scales],
        )

    # ---------------------------------------------------------------- scores
    def _probabilities(self, embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(..., E) image-side embeddings -> (..., N) softmax over the N text embeddings."""
        return torch.softmax(self._logit_scale * embeddings @ text.T, dim=-1)

    def _visual_scores(self, embeddings: torch.Tensor, scale: int, exclude_owner: int | None) -> torch.Tensor:
        """(T, W, E) -> (T, W): 0.5 x (1 - max cosine to the memory of `scale`, minus `exclude_owner`)."""
        assert self._memory is not None
        memory, owners = self._memory[scale]
        similarity = embeddings @ memory.T  # (T, W, M)
        if exclude_owner is not None:
            similarity[..., owners == exclude_owner] = -1.0  # the worst cosine: never the nearest
        return 0.5 * (1.0 - similarity.amax(dim=-1))

    @torch.inference_mode()
    def _score_tiles(self, embedded: TileEmbeddings, exclude_owner: int | None = None) -> _TileScores:
        """Patch-grid anomaly maps (language; visual too with a memory) and class probabilities of tiles."""
        grid, patches = self.encoder.grid, self.encoder.num_patches
        language, classes, visual = [], [], []
        for scale, (windows, indices) in enumerate(zip(embedded.windows, self.encoder.windows, strict=True)):
            anomalous = self._probabilities(windows, self._state_text)[..., 1]
            language.append(harmonic_aggregate(anomalous, indices, patches))
            if self._class_text is not None:
                per_window = self._probabilities(windows, self._class_text)  # (T, W, C)
                per_class = harmonic_aggregate(per_window, indices, patches)
                classes.append(per_class / per_class.sum(dim=-1, keepdim=True))
            if self._memory is not None:
                scores = self._visual_scores(windows, scale, exclude_owner)
                visual.append(harmonic_aggregate(scores, indices, patches))
        anomaly = torch.stack(language).mean(dim=0)  # (T, P)
        if self._memory is not None:
            visual.append(self._visual_scores(embedded.patches, len(embedded.windows), exclude_owner))
            anomaly = 0.5 * (anomaly + torch.stack(visual).mean(dim=0))
        channels = [anomaly[:, None]]
        if classes:
            channels.append(torch.stack(classes).mean(dim=0).transpose(1, 2))  # (T, C, P)
        grids = torch.cat(channels, dim=1).view(len(anomaly), -1, *grid)
        global_probs = self._probabilities(embedded.image, self._state_text)[:, 1]
        return _TileScores(grids.float(), global_probs.float())

    def _assemble(self, shape: tuple[int, ...], scores: _TileScores) -> tuple[np.ndarray, np.ndarray, float]:
        """Stitch tile grids into (H, W) anomaly map, (C, H, W) class probabilities and the image score."""
        height, width = shape[:2]
        tile, origins = self._tile_layout(height, width)
        upsampled = F.interpolate(scores.grids, size=tile, mode="bilinear", align_corners=False).numpy()
        if len(origins) == 1:
            stitched = upsampled[0]
        else:
            stitched = stitch_tiles(list(upsampled), origins, height, width, self.config.tile_overlap)
        anomaly_map = np.ascontiguousarray(stitched[0], dtype=np.float32)
        score = 0.5 * (float(scores.global_probs.max()) + float(anomaly_map.max()))
        return anomaly_map, np.ascontiguousarray(stitched[1:], dtype=np.float32), score

    def _scores_of(self, image: np.ndarray) -> _TileScores:
        key = _image_key(image)
        return self._cache[key] if key in self._cache else self._score_tiles(self._embed(image))

    # ---------------------------------------------------------------- fit / predict
    def _build_memory(self, normals: Sequence[TileEmbeddings]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per window scale, then the patch scale: all normal embeddings (M, E) and their owner (M,)."""
        per_scale: list[list[torch.Tensor]] = [[] for _ in range(len(self.encoder.windows) + 1)]
        owners: list[list[torch.Tensor]] = [[] for _ in per_scale]
        for index, embedded in enumerate(normals):
            for scale, embeddings in enumerate([*embedded.windows, embedded.patches]):
                rows = embeddings.flatten(0, 1)
                per_scale[scale].append(rows)
                owners[scale].append(torch.full((len(rows),), index))
        return [(torch.cat(rows), torch.cat(owner)) for rows, owner in zip(per_scale, owners, strict=True)]

    def fit(self, pool: Sequence[np.ndarray], normals: Sequence[np.ndarray] = ()) -> None:
        """Score the pool and choose the thresholds; `normals` (k known-good images) enable few-shot.

        Args:
            pool: the images to label, (H, W, 3) uint8 each (their scores are cached for `predict`).
            normals: known-good references; empty = zero-shot.
        """
        _check_images(pool, "pool")
        _check_images(normals, "normal")
        if not pool and len(normals) < 2:
            raise ValueError("fit needs images to choose thresholds from: a pool, or two or more normals")
        normal_embeddings = [self._embed(normal) for normal in normals]
        self._memory = self._build_memory(normal_embeddings) if normals else None
        self._cache = {}
        for image in track(pool, "teacher embedding"):
            key = _image_key(image)
            if key not in self._cache:  # a duplicate in the pool is embedded once
                self._cache[key] = self._score_tiles(self._embed(image))
        rng = np.random.default_rng(self.config.seed)
        pool_maps, pool_scores = self._maps_and_scores(pool, [self._scores_of(image) for image in pool], rng)
        if len(normals) >= 2:
            normal_scores = [
                self._score_tiles(embedded, exclude_owner=index)
                for index, embedded in enumerate(normal_embeddings)
            ]
            normal_pixels, image_scores = self._maps_and_scores(normals, normal_scores, rng)
            margin = self.config.normal_margin_mads
            self.pixel_threshold = float(normal_pixels.max()) + margin * median_and_sigma(normal_pixels)[1]
            self._score_sigma = median_and_sigma(pool_scores if len(pool_scores) else image_scores)[1]
            self.image_threshold = float(image_scores.max()) + margin * self._score_sigma
            source = f"{len(normals)} normals (leave-one-out)"
        else:
            median, sigma = median_and_sigma(pool_maps)
            self.pixel_threshold = median + self.config.threshold_mads * sigma
            median, self._score_sigma = median_and_sigma(pool_scores)
            self.image_threshold = median + self.config.image_threshold_mads * self._score_sigma
            source = f"pool of {len(pool)}"
        logger.info(
            "open_clip teacher thresholds from %s: pixel %.4f, image %.4f",
            source,
            self.pixel_threshold,
            self.image_threshold,
        )

    def _maps_and_scores(
        self, images: Sequence[np.ndarray], scores: Sequence[_TileScores], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """A random sample of the images' map pixels (at most 10^6 in all) and their image scores."""
        per_image = max(1, _MAX_PIXEL_SAMPLES // max(1, len(images)))
        samples, image_scores = [], []
        for image, tile_scores in zip(images, scores, strict=True):
            anomaly_map, _, score = self._assemble(image.shape, tile_scores)
            flat = anomaly_map.ravel()
            samples.append(flat if flat.size <= per_image else rng.choice(flat, per_image, replace=False))
            image_scores.append(score)
        return np.concatenate(samples) if samples else np.zeros(0), np.asarray(image_scores)

    def predict(self, images: Sequence[np.ndarray]) -> list[TeacherPrediction]:
        """One prediction per (H, W, 3) uint8 image, maps and class probabilities at its own resolution."""
        if self.pixel_threshold is None or self.image_threshold is None or self._score_sigma is None:
            raise RuntimeError("call fit(pool, normals) before predict(images)")
        _check_images(images, "input")
        predictions = []
        for image in track(images, "teacher predict"):
            anomaly_map, class_probs, score = self._assemble(image.shape, self._scores_of(image))
            anomalous = score >= self.image_threshold
            mask = anomaly_map >= self.pixel_threshold if anomalous else np.zeros(anomaly_map.shape, bool)
            uncertainty = math.exp(-0.5 * ((score - self.image_threshold) / self._score_sigma) ** 2)
            predictions.append(
                TeacherPrediction(
                    anomaly_map=anomaly_map,
                    score=score,
                    mask=mask,
                    uncertainty=float(uncertainty),
                    class_probs=class_probs if len(self.class_names) else None,
                )
            )
        return predictions
