"""QRPO, RPO and DRO trainers for Hugging Face TRL: pointwise alignment by regression onto a closed-form target."""

from .dro_config import DROConfig
from .dro_trainer import DROTrainer
from .pointwise_collator import DataCollatorForPointwise
from .pointwise_config import PointwiseConfig
from .pointwise_trainer import PointwiseTrainer
from .prompt_grouping import PromptGroupedSampler
from .qrpo_config import QRPOConfig
from .qrpo_trainer import QRPOTrainer
from .reference_config import ReferenceConfig
from .reference_stage import precompute_rewards
from .rpo_config import RPOConfig
from .rpo_trainer import RPOTrainer


__version__ = "0.1.0"

__all__ = [
    "DataCollatorForPointwise",
    "DROConfig",
    "DROTrainer",
    "PointwiseConfig",
    "PointwiseTrainer",
    "PromptGroupedSampler",
    "QRPOConfig",
    "QRPOTrainer",
    "ReferenceConfig",
    "RPOConfig",
    "RPOTrainer",
    "precompute_rewards",
]
