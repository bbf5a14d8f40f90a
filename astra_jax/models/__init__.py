"""ASTRA image -> spectrum + redshift models (Flax linen)."""

from astra_jax.models.astra import (DEFAULT_NUM_Z_BINS, DEFAULT_Z_MAX, PATCH_EMBEDDINGS, Astra,
                                    PatchCNN, RedshiftHead, SpectrumDecoder, patch_grid,
                                    z_bin_centers, z_pdf_stats)
from astra_jax.models.transformer import (MultiHeadAttention, TransformerBlock, TransformerEncoder,
                                          sincos_2d)
