"""Training and fine-tuning: data preparation (``data``) and the loop with checkpoints and DDP/FSDP (``loop``)."""

from .data import BlockOrder, DataError, DataSpec, PackedBlocks, TokenizedData, prepare
from .loop import TrainConfig, lm_loss, lr_factor, param_groups, train

__all__ = [
    "BlockOrder", "DataError", "DataSpec", "PackedBlocks", "TokenizedData", "TrainConfig",
    "lm_loss", "lr_factor", "param_groups", "prepare", "train",
]
