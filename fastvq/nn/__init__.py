"""Modules: drop-in replacements for the layers VQ training scripts use today."""

from .bitcodes import Bitcodes
from .qr_embedding import QREmbedding
from .residual_quantizer import ResidualQuantizer
from .rqvae import RQVAE
from .vector_quantizer import VectorQuantizer

__all__ = ["VectorQuantizer", "ResidualQuantizer", "RQVAE", "QREmbedding", "Bitcodes"]
