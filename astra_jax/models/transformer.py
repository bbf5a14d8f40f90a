"""Pre-norm transformer encoder over a grid of patch tokens, plus a learned summary token.

Token layout (B = batch, N = grid_h * grid_w patch tokens in row-major grid order, D = dim):
`[patch_0, ..., patch_{N-1}, summary]`, i.e. the summary token is APPENDED at index N (= -1), as in
the seed. The fixed 2-D sin-cos position code is added to the patch tokens only.

Only the summary token leaves the encoder for the heads, so with `summary_only` the last block
computes its query, attention output and MLP for the summary token alone (keys and values still
for every token): the same summary, bit for bit up to float summation order, dropout included,
for ~1/7 fewer FLOPs at the seed's size (6 layers, 325 tokens).
"""

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from astra_jax.models.common import (Dense, Dtype, dense_f32_acc, einsum_f32_acc,
                                     flat_lecun_normal)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position code of a patch grid, shape (grid_h * grid_w, dim), float32.

  Rows are in row-major grid order (token index = row * grid_w + col). The first dim/2 channels
  encode the column, the last dim/2 the row, each as [sin(pos * w_k), cos(pos * w_k)] with
  w_k = 10000^(-k / (dim/4)), k = 0..dim/4-1 (the MAE / big_vision "sincos2d" code).
  """
  if dim % 4:
    raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos position code, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  x = cols.reshape(-1, 1) * omega[None]
  y = rows.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def _mix32(x: jax.Array) -> jax.Array:
  """A bijective avalanche mix of uint32 words (C. Wellons' "lowbias32")."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def keep_mask(rng: jax.Array, shape: Sequence[int], keep_prob: float,
              window: Optional[Tuple[Sequence[int], Sequence[int]]] = None) -> jax.Array:
  """Bernoulli(keep_prob) bool mask of `shape`, a pure function of the key `rng`.

  Element i (row-major flat index) is kept when mix(mix(i ^ s0) ^ s1) < round(keep_prob * 2^32),
  with (s0, s1) 64 bits drawn from `rng`: one fused integer pass, where threefry (or rbg) bits for
  every element cost ~10% of a CPU train step. The keep rate is exact to 2^-32.
  `window=(full_shape, start)`: the block of the mask of `full_shape` that starts at `start` and
  has `shape` (so a computation restricted to some rows draws exactly those rows' mask).
  """
  full_shape, start = window if window is not None else (shape, (0,) * len(shape))
  if np.prod(full_shape) >= 2**32:
    raise ValueError(f"dropout over {np.prod(full_shape)} >= 2^32 elements would repeat its mask")
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    position = lax.broadcasted_iota(jnp.uint32, tuple(shape), axis) + jnp.uint32(start[axis])
    index = index + position * jnp.uint32(stride)
    stride *= full_shape[axis]
  bits = _mix32(_mix32(index ^ seed[0]) ^ seed[1])
  return bits < jnp.uint32(_threshold(keep_prob))


def _threshold(keep_prob: float) -> int:
  return min(round(keep_prob * 2**32), 2**32 - 1)


class Dropout(nn.Module):
  """Inverted dropout (`nn.Dropout`'s contract: rate, "dropout" rng) with `keep_mask` masks.

  `window=(full_shape, start)`: x is that block of a tensor of `full_shape` and gets its mask.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, window=None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate, window)
    # Scaled by the exact keep rate of the integer threshold, so E[output] = x.
    scale = jnp.asarray(2**32 / _threshold(1.0 - self.rate), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(x: jax.Array, axis: int) -> tuple[jax.Array, ...]:
  """The slices of x along `axis` (`x[:, :, i]` for axis 2); the gradient stacks their cotangents.

  Slicing's own gradient pads each cotangent to x's shape and sums the pads: exact, but in
  bfloat16 every pad and sum is rounded again, which kept XLA:CPU from turning them into one
  concatenation (in a profiled seed bf16 step the six blocks' qkv cotangents took 0.48 s of loop
  fusions padded and summed, 0.19 s stacked; 0.08 s in float32: CPU time over both cores).
  """
  return tuple(lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis]))


def _unstack_fwd(x, axis):
  return unstack(x, axis), None


def _unstack_bwd(axis, _, cotangents):
  return (jnp.stack(cotangents, axis=axis),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


class QKVProjection(nn.Module):
  """Fused query/key/value projection of x (B, T, D): (q, k, v), each (B, T, H, Dh) in `dtype`.

  Parameters and initialisers are those of `nn.DenseGeneral((3, H, Dh))`: kernel (D, 3, H, Dh),
  bias (3, H, Dh). `last_query_only`: q of the last token only, (B, 1, H, Dh).
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, last_query_only: bool = False):
    dim, shape = x.shape[-1], (3, self.num_heads, self.head_dim)
    kernel = self.param("kernel", flat_lecun_normal(1), (dim, *shape), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), shape, self.param_dtype)
    project = lambda inputs, w, b: dense_f32_acc(inputs, w, b, self.dtype)
    if not last_query_only:
      return unstack(project(x, kernel, bias), 2)
    k, v = unstack(project(x, kernel[:, 1:], bias[1:]), 2)
    return project(x[:, -1:], kernel[:, 0], bias[0]), k, v


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention that also returns its attention weights.

  Projections use float32 accumulation (see `common`); logits and softmax are float32.
  Returns `(out (B, T_query, D) in dtype, weights (B, heads, T_query, T) float32)`; T_query = T,
  or 1 with `last_query_only` (only the last token attends: the summary token's row).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, last_query_only: bool = False) -> Tuple[jax.Array, jax.Array]:
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={self.num_heads}")
    head_dim = dim // self.num_heads
    # One fused projection: one matmul instead of three.
    q, k, v = QKVProjection(self.num_heads, head_dim, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="qkv")(x, last_query_only)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = einsum_f32_acc("bqhd,bkhd->bhqk", q, k, dtype=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1)
    out = einsum_f32_acc("bhqk,bkhd->bqhd", weights.astype(self.dtype), v, dtype=self.dtype)
    out = Dense(dim, in_axes=2, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(out)
    return out, weights


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Dropout(MHA(LN(x))), then x + Dropout(MLP(LN(x))).

  MLP: Dense(mlp_ratio * D) -> GELU (exact, as torch's nn.GELU) -> Dropout -> Dense(D).
  The residual stream keeps the dtype of `x` (float32 in `Astra`); the branches run in `dtype`.
  Sows the attention weights (B, heads, T, T) float32 as `intermediates/attention_weights`
  (collected only when `mutable=["intermediates"]` is passed to `apply`).
  Returns `(x (B, T, D), attention weights (B, heads, T, T) float32)`; with `summary_only` only
  the last token's row of both, (B, 1, D) and (B, heads, 1, T), computed alone (nothing sown).
  """
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               summary_only: bool = False) -> Tuple[jax.Array, jax.Array]:
    batch, tokens, dim = x.shape
    dense = lambda features, name: Dense(features, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
    # Flax norms compute their statistics in float32 even when dtype is bfloat16.
    layer_norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name=name)
    # The rows computed, as a window of the full (B, T, features) tensors: their dropout masks.
    window = lambda h: (((batch, tokens, h.shape[-1]), (0, tokens - 1, 0)) if summary_only
                        else None)
    dropout = lambda h: Dropout(self.dropout)(h, deterministic=not train, window=window(h))

    h = layer_norm("ln_attn")(x)
    h, weights = MultiHeadAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="attn")(h, last_query_only=summary_only)
    if not summary_only:
      self.sow("intermediates", "attention_weights", weights)
    x = x[:, -1:] if summary_only else x
    x = x + dropout(h).astype(x.dtype)

    h = layer_norm("ln_mlp")(x)
    h = dense(self.mlp_ratio * dim, "mlp_in")(h)
    h = nn.gelu(h, approximate=False)
    h = dropout(h)
    h = dense(dim, "mlp_out")(h)
    x = x + dropout(h).astype(x.dtype)
    return x, weights


class TransformerEncoder(nn.Module):
  """Position code + appended summary token + `num_layers` pre-norm blocks + final LayerNorm.

  `__call__(tokens (B, N, D), grid_shape=(grid_h, grid_w), *, train, summary_only=False)` returns
  `(sequence (B, N+1, D), summary (B, D), summary_attention (B, heads, grid_h, grid_w))`, float32:
  the final-LayerNorm'd tokens (summary last), the summary token, and the LAST block's attention of
  the summary token (as query) over the patch tokens, reshaped onto the patch grid. The summary
  token's attention to itself is dropped, so each map sums to 1 minus that self-weight.
  `summary_only`: the last block computes the summary token alone (see the module docstring);
  `sequence` is then (B, 1, D), the summary token, and the last block sows nothing.
  """
  num_layers: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, grid_shape: Tuple[int, int], *, train: bool,
               summary_only: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array]:
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    batch, num_tokens, dim = tokens.shape
    grid_h, grid_w = grid_shape
    if grid_h * grid_w != num_tokens:
      raise ValueError(f"grid_shape {grid_shape} does not match {num_tokens} tokens")
    # The residual stream is float32: summing many bf16 branch outputs in bf16 would lose precision.
    x = tokens.astype(jnp.float32) + sincos_2d(grid_h, grid_w, dim)[None]
    summary = self.param("summary_token", nn.initializers.normal(stddev=0.02), (1, 1, dim),
                         self.param_dtype)
    x = jnp.concatenate([x, jnp.broadcast_to(summary.astype(jnp.float32), (batch, 1, dim))], axis=1)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x, weights = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name=f"block_{i}")(
                                        x, train=train, summary_only=summary_only and last)
    x = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype, name="ln_final")(x)
    summary_attention = weights[:, :, -1, :num_tokens].reshape(batch, -1, grid_h, grid_w)
    return x, x[:, -1], summary_attention
