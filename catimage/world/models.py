"""The world generators' architectures: two sizes of one diffusers UNet family, and their schedule.

Both sizes share everything but width (4x the parameters), so
"small at few steps" vs "large at many steps" is a clean capacity x steps trade-off. The noise schedule is
the cosine one (squaredcos_cap_v2) with v-prediction, which keeps few-step DDIM sampling (trailing
timesteps) usable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catimage.world.pipeline import COORD_CHANNELS, IMAGE_CHANNELS, PACK, TEXT_DIM

IMAGE_SIZE = 32
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class WorldModelSpec:
    """One generator size: UNet widths and where it attends to the text."""

    name: str
    block_out_channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]  # cross/self-attention at each resolution (16, 8, 4)
    cross_attention_dim: int
    attention_head_dim: int
    layers_per_block: int = 1
    norm_num_groups: int = 8

    def unet_config(self) -> dict[str, Any]:
        """Keyword arguments of `diffusers.UNet2DConditionModel`."""
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels))
        return {
            "sample_size": IMAGE_SIZE // PACK,
            "in_channels": IMAGE_CHANNELS * PACK * PACK + COORD_CHANNELS,
            "out_channels": IMAGE_CHANNELS * PACK * PACK,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_num_groups,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_head_dim": self.attention_head_dim,
            "encoder_hid_dim": TEXT_DIM,
            "encoder_hid_dim_type": "text_proj",
        }


MODELS: dict[str, WorldModelSpec] = {
    "mini": WorldModelSpec("mini", (16, 32, 32), (False, True, True), cross_attention_dim=32, attention_head_dim=16),
    "small": WorldModelSpec("small", (32, 64, 64), (False, True, True), cross_attention_dim=64, attention_head_dim=16),
    "large": WorldModelSpec("large", (64, 128, 128), (False, True, True), cross_attention_dim=128, attention_head_dim=32),
}
