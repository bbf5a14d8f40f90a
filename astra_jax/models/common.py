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

The backward pass multiplies bf16 by bf16 too: each product's float32 cotangent is rounded to bf16
before its two gradient matmuls (`_einsum_f32`), as torch's autocast does. Left to autodiff, a
float32 cotangent times a bf16 operand is a float32 matmul, and with bf16 hardware (a 2-core Zen 4
with AVX512-BF16) the seed-size bf16 step took the float32 step's time: 14.0 s, 7.0 s since.
"""

import functools
import math
import re
import string
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# XLA options for every jitted computation of the model (train, eval and predict steps): XLA's
# default lets it keep values in float32 where the program rounds them to bf16, or move the
# rounding (`xla_allow_excess_precision`), so the jitted bf16 model was not the one written here
# (outputs up to 1e-2 from an op-by-op run of the same code; `tests/test_models.py`). Without it
# the jitted bf16 model rounds exactly where the code does, and it ran faster on a 2-core Zen 4:
# a seed-size bf16 train step 7.47 and 7.70 -> 7.06 and 6.96 s (two alternating pairs of fresh
# processes), the small peer-matched patch CNN's forward and backward passes 1.21-1.27 ->
# 1.09-1.17 s (medians of 16, three pairs): XLA:CPU computes bf16 pads, slices and
# concatenations in float32, and with excess precision allowed it carried those float32 values
# into the next fusion instead of writing bf16 ones.
COMPILER_OPTIONS = {"xla_allow_excess_precision": False}


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


def _low_precision(*operands) -> bool:
  return any(x.dtype != jnp.float32 for x in operands)


_DENSE = "mk,kn->mn"  # `dot_f32`'s 2-D product (every Dense).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """Two-operand `jnp.einsum` with float32 result whose gradients are also matmuls of operands in
  the inputs' dtype (bf16 x bf16 -> float32, or float32), in forms XLA:CPU runs well (below).
  Every index of `a` must appear in `b` or the output, and vice versa (none summed within one
  operand).

  Differentiating the plain einsum multiplies the float32 cotangent by a bf16 operand, which
  XLA:CPU widens to a float32 matmul: 2/3 of a training step's FLOPs at the float32 rate (seed
  config in bf16 on a 2-core Zen 4 with AVX512-BF16: 14.0 s a step, the float32 step's time).
  The cotangent is rounded to the operands' dtype first, as mixed-precision backward passes do
  (torch's autocast included); for a product that the model rounds to bf16 anyway (every
  Dense), that rounding is exact.
  """
  return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(subscripts, a, b):
  return _einsum_f32(subscripts, a, b), (a, b)


def _einsum_f32_bwd(subscripts, residuals, g):
  a, b = residuals
  inputs, out = subscripts.split("->")
  sub_a, sub_b = inputs.split(",")
  unit = next(c for c in string.ascii_letters if c not in subscripts)
  g = g.astype(a.dtype)

  def grad(sub_x, x, sub_like, like):
    # The contraction with an extra unit axis on both operands: XLA:CPU widens a bf16 dot whose
    # lhs contracts its leading axis (a Dense kernel's gradient a^T g) to float32, half the bf16
    # rate here, and a batched one it keeps in bf16 but then cannot run ("Unsupported element
    # type for DotThunk::Execute: BF16 x BF16 = F32"); this form it lowers to a transposed copy
    # of the operand and a bf16 dot.
    spec = f"{unit}{out},{unit}{sub_x}->{sub_like}"
    return jnp.einsum(spec, g[None], x[None], preferred_element_type=jnp.float32
                      ).astype(like.dtype)

  if subscripts == _DENSE and g.size < a.size:
    # The kernel's gradient a^T g as (g^T a)^T, so that the transposed copy is of the smaller
    # operand: the patch CNN's projection (a 10368 x 16384, g 10368 x 128), 197 -> 127 ms. The
    # barrier keeps XLA from folding the transpose into the dot, which it then cannot run (the
    # DotThunk error above).
    d_b = jnp.einsum(f"{unit}mn,{unit}mk->nk", g[None], a[None],
                     preferred_element_type=jnp.float32)
    return grad(sub_b, b, sub_a, a), lax.optimization_barrier(d_b).T.astype(b.dtype)
  return grad(sub_b, b, sub_a, a), grad(sub_a, a, sub_b, b)


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def dot_f32(lhs, rhs, dimension_numbers) -> jax.Array:
  """`lax.dot_general` with float32 accumulation and result (bf16 operands: see the module
  docstring).

  A contraction of lhs's trailing axes with rhs's leading axes (every Dense) runs as one 2-D
  (M, K) x (K, N) matmul: XLA:CPU runs multi-axis contractions (the fused qkv kernel
  (D, 3, H, Dh), the output projection (H, Dh, D)) and their gradients ~30% slower. Its
  gradients are `_einsum_f32`'s, in float32 too: there autodiff's forms (a transposed rhs, the
  larger operand transposed) ran the patch CNN projection's backward pass in 0.84 s against
  0.52 s, and the small peer-matched float32 step in 2.66-2.87 s against 2.44-2.54 s (seed
  float32 within noise); with bf16 operands they are bf16 matmuls.
  """
  lhs, rhs = matmul_operands(lhs, rhs)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contract)
  if (not lhs_batch and not rhs_batch and
      tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim)) and
      tuple(rhs_contract) == tuple(range(k))):
    out_shape = lhs.shape[:lhs.ndim - k] + rhs.shape[k:]
    contract = math.prod(lhs.shape[lhs.ndim - k:])
    lhs, rhs = lhs.reshape(-1, contract), rhs.reshape(contract, -1)
    return _einsum_f32(_DENSE, lhs, rhs).reshape(out_shape)
  return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def grouped_matmul_kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The gradient of x (G, R, K) @ w (K, N) with respect to w for the cotangent g (G, R, N):
  sum over groups of x_g^T g_g, (K, N) float32, with g rounded to x's dtype first.

  One product per group, summed in float32. For a patch CNN's im2col matmul (K = 3 x 32 taps,
  N = 64 channels, patches of 256 pixels as the groups) XLA:CPU ran the one product over all
  G*R rows far slower: in bf16, 2592 patches, 285 ms against 84 ms per patch; in float32, at
  batch 32 (2,654,208 x 96 x 64, a 2-core Zen 4), 0.50-2.2 s against 0.31-0.32 s.
  """
  x, g = matmul_operands(x, g.astype(x.dtype))
  per_group = jnp.einsum("gurn,gurk->gkn", g[:, None], x[:, None],
                         preferred_element_type=jnp.float32)
  return per_group.sum(0)


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
  """`jnp.einsum` with float32 accumulation, result cast to `dtype`; two bf16 operands (with
  bf16 hardware) differentiate as bf16 matmuls too (`_einsum_f32`)."""
  operands = matmul_operands(*operands)
  if len(operands) == 2 and _low_precision(*operands) and "->" in subscripts:
    return _einsum_f32(subscripts, *operands).astype(dtype)
  out = jnp.einsum(subscripts, *operands, preferred_element_type=jnp.float32)
  return out.astype(dtype)


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """`jnp.dtype` of a dtype or its name ("float32", "bfloat16", "bf16", "fp32")."""
  aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}
  if isinstance(dtype, str):
    dtype = aliases.get(dtype, dtype)
  return jnp.dtype(dtype)
