"""Pure-torch references: the test oracle and the path for tensors Triton cannot run on.

Each ``<op>_ref`` has the same signature as the public op. They work in row chunks so that
their extra memory stays bounded on large inputs (never an N x K matrix beyond the output).
"""

from .code_statistics import code_statistics_ref
from .code_usage import code_usage_ref
from .mine_negatives import mine_negatives_ref
from .nearest_code import nearest_code_ref
from .pairwise_kl_loss import pairwise_kl_loss_ref
from .pairwise_sqdist import pairwise_sqdist_ref
from .qr_lookup import qr_lookup_ref
from .residual_quantize import residual_quantize_ref
from .rotation_trick import rotation_trick_ref
from .sample_code import sample_code_ref
from .semantic_ids import semantic_ids_ref
from .topk_codes import topk_codes_ref

__all__ = [
    "code_statistics_ref",
    "code_usage_ref",
    "mine_negatives_ref",
    "nearest_code_ref",
    "pairwise_kl_loss_ref",
    "pairwise_sqdist_ref",
    "qr_lookup_ref",
    "residual_quantize_ref",
    "rotation_trick_ref",
    "sample_code_ref",
    "semantic_ids_ref",
    "topk_codes_ref",
]
