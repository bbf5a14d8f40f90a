"""Mixed-precision helpers shared by the ASTRA modules.

Convention: `dtype` is the compute dtype of matmuls/convolutions (float32 or bfloat16),
`param_dtype` the storage dtype of parameters (float32). In bfloat16 mode every matmul and
convolution takes bf16 operands but accumulates in float32 (`preferred_element_type=jnp.float32`)
and casts the result back to bf16; LayerNorm statistics, softmax, the residual stream and all model
outputs stay float32.
"""

import math
from typing import Any

import jax.numpy as jnp
from jax import lax

Dtype = Any


def dot_general_f32_acc(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` with float32 accumulation, result cast to the operands' dtype.

  Drop-in for the `dot_general` hook of `nn.Dense`/`nn.DenseGeneral`. For float32 operands this is
  plain `lax.dot_general`; for bf16 operands it accumulates in float32 (more accurate, and on some
  backends faster than a bf16-output dot) and returns bf16 so downstream ops stay in bf16.
  A contraction of lhs's trailing axes with rhs's leading axes (every Dense/DenseGeneral) runs as
  one 2-D (M, K) x (K, N) matmul: XLA:CPU runs multi-axis contractions (a fused qkv kernel
  (D, 3, H, Dh), the output projection (H, Dh, D)) and their gradients ~30% slower.
  """
  del preferred_element_type  # Always float32 accumulation; the output dtype follows the operands.
  out_dtype = jnp.result_type(lhs, rhs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contract)
  if (not lhs_batch and not rhs_batch and
      tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim)) and
      tuple(rhs_contract) == tuple(range(k))):
    out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
    contract = math.prod(lhs.shape[lhs.ndim - k:])
    out = lax.dot_general(lhs.reshape(-1, contract), rhs.reshape(contract, -1),
                          (((1,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
    return out.reshape(out_shape).astype(out_dtype)
  out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def conv_general_dilated_f32_acc(lhs, rhs, *args, preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated` with float32 accumulation, result cast to the operands' dtype.

  Drop-in for the `conv_general_dilated` hook of `nn.Conv` (same contract as `dot_general_f32_acc`).
  """
  del preferred_element_type
  out_dtype = jnp.result_type(lhs, rhs)
  out = lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=jnp.float32, **kwargs)
  return out.astype(out_dtype)


def einsum_f32_acc(subscripts: str, *operands, dtype: Dtype):
  """`jnp.einsum` with float32 accumulation, result cast to `dtype`."""
  out = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
  return out.astype(dtype)


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """`jnp.dtype` of a dtype or its name ("float32", "bfloat16", "bf16", "fp32")."""
  aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}
  if isinstance(dtype, str):
    dtype = aliases.get(dtype, dtype)
  return jnp.dtype(dtype)
