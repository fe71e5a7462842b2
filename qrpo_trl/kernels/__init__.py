"""
Log-prob kernels of the trainers' forwards: TRL's fused LM head made compact off Triton (`fused_lm_head`) and
per-sample attention for packed rows (`packed_attention`).
"""

from .fused_lm_head import compact_fused_lm_head
from .packed_attention import PER_SAMPLE_IMPLEMENTATIONS, per_sample_attention
