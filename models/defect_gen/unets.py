"""The two denoisers: diffusers ``UNet2DModel``s over joint image + mask channels.

A sample is ``3 + (K + 1)`` channels: RGB scaled to [-1, 1] and the one-hot class mask over background and
the project's K classes, also scaled to [-1, 1] (so background pixels read +1 in channel 3 and -1 in the
others). Both networks are class-conditional through ``num_class_embeds = K + 1``: label k asks for a defect
of class k (label 0, background, is never asked for).

- The large model (noisy steps, global structure): 3-4 levels, attention at the low resolutions, so its
  receptive field covers the whole crop.
- The small model (late steps, local detail): 2 levels, no attention, one ResNet block per level: its
  receptive field is a few dozen pixels, and it is trained on patches.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from models.defect_gen.config import DefectGenConfig

#: RGB channels ahead of the mask channels.
IMAGE_CHANNELS = 3


def joint_channels(num_classes: int) -> int:
    """Channels of a joint sample: RGB + one-hot over background and ``num_classes`` classes."""
    return IMAGE_CHANNELS + num_classes + 1


def build_large_unet(config: DefectGenConfig, num_classes: int) -> UNet2DModel:
    """The large-receptive-field denoiser for t >= s: attention at the levels ``large_attention`` names."""
    down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in config.large_attention)
    up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(config.large_attention))
    channels = joint_channels(num_classes)
    return UNet2DModel(
        sample_size=config.crop_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.large_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.large_layers,
        norm_num_groups=config.norm_groups,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1,
        add_attention=True,
    )


def build_small_unet(config: DefectGenConfig, num_classes: int) -> UNet2DModel:
    """The shallow patch-level denoiser for t < s: no attention anywhere (not even in the mid block)."""
    levels = len(config.small_channels)
    channels = joint_channels(num_classes)
    return UNet2DModel(
        sample_size=config.patch_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.small_channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=config.small_layers,
        norm_num_groups=config.norm_groups,
        num_class_embeds=num_classes + 1,
        add_attention=False,
    )
