"""Mixed-precision helpers shared by the ASTRA modules.

Convention: `dtype` is the compute dtype of matmuls (float32 or bfloat16), `param_dtype` the
storage dtype of parameters (float32). In bfloat16 mode every matmul takes bf16 operands
(activations and weights rounded to bf16), multiplies them exactly, accumulates in float32 and
rounds the result to bf16 (a Dense layer's after adding its bias in float32); LayerNorm
statistics, softmax, the residual stream and all model outputs stay float32.

How that product is computed depends on the hardware, not its value (up to summation order): with
bf16 matmul units (GPU, TPU, CPUs with AVX512-BF16 or AMX) as a bf16 dot with
`preferred_element_type=float32`; on other CPUs the bf16 operands are widened to float32 first
(exact: every bf16 is a float32, and a product of two bf16 fits a float32 mantissa) and run through
the float32 matmul, because there XLA:CPU's bf16 x bf16 -> float32 dot runs at ~0.7x its float32
rate (4096^2 matmul on a 2-core AVX2 AMD EPYC: 46.6 vs 68.7 GFLOP/s; a bf16-output dot is
widened to float32 by XLA itself).
"""

import functools
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


@functools.cache
def native_bf16_matmul() -> bool:
  """Whether the default backend multiplies bf16 natively (faster than float32)."""
  if jax.default_backend() != "cpu":
    return True
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:
    return False
  return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def matmul_operands(*operands):
  """The operands as the matmul should see them: bf16 widened to float32 without bf16 hardware."""
  if native_bf16_matmul():
    return operands
  return tuple(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in operands)


def dot_f32(lhs, rhs, dimension_numbers) -> jax.Array:
  """`lax.dot_general` with float32 accumulation and result (bf16 operands: see the module
  docstring).

  A contraction of lhs's trailing axes with rhs's leading axes (every Dense) runs as one 2-D
  (M, K) x (K, N) matmul: XLA:CPU runs multi-axis contractions (the fused qkv kernel
  (D, 3, H, Dh), the output projection (H, Dh, D)) and their gradients ~30% slower.
  """
  lhs, rhs = matmul_operands(lhs, rhs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contract)
  if (not lhs_batch and not rhs_batch and
      tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim)) and
      tuple(rhs_contract) == tuple(range(k))):
    out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
    contract = math.prod(lhs.shape[lhs.ndim - k:])
    out = lax.dot_general(lhs.reshape(-1, contract), rhs.reshape(contract, -1),
                          (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return out.reshape(out_shape)
  return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def dense_f32_acc(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
  """x (..., *K) contracted with kernel (*K, *F), plus bias (*F), rounded once to `dtype`.

  x and kernel are rounded to `dtype` (the matmul operands); the product accumulates in float32
  and the bias is added in float32 before the one rounding (as a GPU matmul epilogue does). The
  bias's gradient is then a float32 reduction, which XLA:CPU runs with YNNPACK; the bf16 one of a
  bf16 bias add became a tree of reduce-windows (1.07 s of a 19.5 s seed-size bf16 step).
  """
  k = kernel.ndim - bias.ndim
  dims = ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ()))
  out = dot_f32(x.astype(dtype), kernel.astype(dtype), dims)
  return (out + bias.astype(jnp.float32)).astype(dtype)


def flat_lecun_normal(in_axes: int):
  """LeCun-normal init of a (*in, *out) kernel as `nn.DenseGeneral` draws it: over the flattened
  (prod(in), prod(out)) matrix, whose first `in_axes` axes are the fan-in."""
  def init(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:in_axes]), math.prod(shape[in_axes:]))
    return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)
  return init


class Dense(nn.Module):
  """`nn.Dense` (and `nn.DenseGeneral` over trailing axes) computed by `dense_f32_acc`.

  x (..., *in) -> (..., *features) in `dtype`, contracting the last `in_axes` axes of x. The
  parameters are `nn.DenseGeneral`'s: kernel (*in, *features), LeCun-normal over the flattened
  (prod(in), prod(features)) matrix; bias (*features), zeros (`nn.Dense`'s when in_axes = 1
  and features is an int), so checkpoints of either restore here.
  """
  features: int | Sequence[int]
  in_axes: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = ((self.features,) if isinstance(self.features, int) else tuple(self.features))
    fan_in = x.shape[x.ndim - self.in_axes:]
    kernel = self.param("kernel", flat_lecun_normal(self.in_axes), fan_in + features,
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), features, self.param_dtype)
    return dense_f32_acc(x, kernel, bias, self.dtype)


def einsum_f32_acc(subscripts: str, *operands, dtype: Dtype):
  """`jnp.einsum` with float32 accumulation, result cast to `dtype`."""
  out = jnp.einsum(subscripts, *matmul_operands(*operands), preferred_element_type=jnp.float32)
  return out.astype(dtype)


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """`jnp.dtype` of a dtype or its name ("float32", "bfloat16", "bf16", "fp32")."""
  aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}
  if isinstance(dtype, str):
    dtype = aliases.get(dtype, dtype)
  return jnp.dtype(dtype)
