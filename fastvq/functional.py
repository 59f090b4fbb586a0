"""The public functions of fastvq (re-exported at the top level)."""

from .ops.bitcodes import to_bits, to_decimal
from .ops.code_statistics import code_statistics
from .ops.code_usage import CodeUsage, CodeUsageMeter, code_usage
from .ops.mine_negatives import mine_negatives
from .ops.nearest_code import nearest_code
from .ops.pairwise_kl_loss import pairwise_kl_loss
from .ops.pairwise_sqdist import pairwise_sqdist
from .ops.qr_lookup import qr_lookup
from .ops.residual_quantize import ResidualQuantizeStep, residual_decode, residual_quantize, residual_quantize_step
from .ops.rotation_trick import rotation_trick
from .ops.sample_code import sample_code
from .ops.semantic_ids import SemanticIdStats, semantic_id_stats, semantic_ids
from .ops.topk_codes import topk_codes

__all__ = [
    "nearest_code",
    "topk_codes",
    "sample_code",
    "pairwise_sqdist",
    "mine_negatives",
    "residual_quantize",
    "residual_quantize_step",
    "ResidualQuantizeStep",
    "residual_decode",
    "code_statistics",
    "code_usage",
    "CodeUsage",
    "CodeUsageMeter",
    "semantic_ids",
    "semantic_id_stats",
    "SemanticIdStats",
    "rotation_trick",
    "qr_lookup",
    "pairwise_kl_loss",
    "to_bits",
    "to_decimal",
]
