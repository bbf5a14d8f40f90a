"""ASTRA: multi-band image -> (normalised spectrum, log10 normalisation, redshift PDF) transformer.

images (B, bands, H, W) -> PatchCNN -> (B, N, dim) patch tokens, N = (H/p)(W/p)
  -> TransformerEncoder (2-D sin-cos positions, appended summary token, pre-norm blocks)
  -> summary token (B, dim) -> SpectrumDecoder (spectrum (B, num_pixels), log_norm (B,))
                            -> RedshiftHead (z_logits (B, num_z_bins)).
The spectrum is on the fixed grid of `astra_jax.grid` (4000 pixels), divided by the per-galaxy
normalisation of `astra_jax.losses.normalise_spectrum`; `log_norm` predicts log10 of that
normalisation, so `losses.denormalise(spectrum, log_norm)` gives flux in 1e-17 erg/s/cm^2/Angstrom.
"""

import dataclasses
import functools
import itertools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from astra_jax.grid import NUM_PIXELS
from astra_jax.models.common import (Dense, Dtype, canonical_dtype, dot_f32,
                                     grouped_matmul_kernel_grad, matmul_operands)
from astra_jax.models.transformer import TransformerEncoder

PATCH_EMBEDDINGS = ("conv2d", "conv1d", "linear")
DEFAULT_NUM_Z_BINS = 180
DEFAULT_Z_MAX = 0.6


def patch_grid(image_hw: Tuple[int, int], patch_size: int) -> Tuple[int, int]:
  """(grid_h, grid_w) = (H / patch_size, W / patch_size); (288, 288), 16 -> (18, 18): 324 tokens."""
  height, width = image_hw
  if height % patch_size or width % patch_size:
    raise ValueError(f"image size {(height, width)} is not divisible by patch_size={patch_size}")
  return height // patch_size, width // patch_size


def _check_patch_embedding(value: str) -> None:
  if value not in PATCH_EMBEDDINGS:
    raise ValueError(f"patch_embedding must be one of {PATCH_EMBEDDINGS}, got {value!r}")


def im2col(x: jax.Array, kernel_size: int) -> jax.Array:
  """SAME, stride-1 sliding windows as channels: (M, *spatial, C) -> (M, *spatial, k^d * C).

  Channel (offset_index * C + c) of the output holds channel c of the input shifted by the
  offset_index-th kernel offset in row-major order over the d spatial axes, zero outside the
  input; so `im2col(x, k) @ kernel.reshape(-1, F)` equals a SAME convolution with a
  (k, ..., k, C, F) kernel (cross-correlation, as `lax.conv_general_dilated` and `nn.Conv`).
  """
  spatial = x.shape[1:-1]
  low = (kernel_size - 1) // 2
  padded = jnp.pad(x, [(0, 0)] + [(low, kernel_size - 1 - low)] * len(spatial) + [(0, 0)])
  views = [padded[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offsets, spatial))]
           for offsets in itertools.product(range(kernel_size), repeat=len(spatial))]
  return jnp.concatenate(views, axis=-1)


def _im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """SAME stride-1 convolution x (M, *spatial, C) * kernel (k, ..., k, C, F) as one matmul,
  accumulated and returned in float32."""
  cols = im2col(x, kernel.shape[0])
  return dot_f32(cols, kernel.reshape(-1, kernel.shape[-1]), (((cols.ndim - 1,), (0,)), ((), ())))


def _native_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The convolution of `_im2col_conv` by `lax.conv_general_dilated` (float32 result)."""
  ndim = x.ndim - 2
  spatial = "HWD"[:ndim]
  lhs, rhs = matmul_operands(x, kernel)
  return lax.conv_general_dilated(
      lhs, rhs, (1,) * ndim, "SAME", preferred_element_type=jnp.float32,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


def _shift(y: jax.Array, shifts: Sequence[int]) -> jax.Array:
  """y (M, *spatial, C) moved along the spatial axes: out[m, i] = y[m, i - shifts], 0 outside."""
  for axis, s in enumerate(shifts, start=1):
    n = y.shape[axis]
    s = max(-n, min(n, s))  # A shift by the whole axis or more leaves zeros.
    kept = lax.slice_in_dim(y, max(-s, 0), n - max(s, 0), axis=axis)
    pads = [(0, 0)] * y.ndim
    pads[axis] = (max(s, 0), max(-s, 0))
    y = jnp.pad(kept, pads)
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def patch_conv(x: jax.Array, kernel: jax.Array, native: bool = True) -> jax.Array:
  """SAME, stride-1 convolution x (M, *spatial, C) * kernel (k, ..., k, C, F) -> (M, *spatial, F),
  accumulated and returned in float32 (cross-correlation, as `nn.Conv`).

  The forward pass is the native convolution (`native=True`; XLA:CPU runs these small-channel
  convolutions ~2x faster than the im2col matmul, small config, batch 32: 0.16 s vs 0.36 s) or
  the im2col matmul (`native=False`, for training: see `PatchConv`). The backward pass is the
  same either way (`_patch_conv_bwd`).
  """
  return _native_conv(x, kernel) if native else _im2col_conv(x, kernel)


def _patch_conv_fwd(x, kernel, native):
  return patch_conv(x, kernel, native), (x, kernel)


def _patch_conv_bwd(native, residuals, g):
  """Both gradients as matmuls of operands in x's dtype (see `common._einsum_f32`).

  The input's gradient is the cotangent times the kernel (one matmul onto every tap at once),
  shifted back tap by tap and summed. Autodiff of the im2col matmul summed the same products
  through a chain of pads and float32 copies, one fusion of 0.34 s in a 2.0 s small peer-matched
  bf16 step. The two convolutions of that step (10368 patches of 256 pixels, 5 -> 32 -> 64
  channels), forward and backward in bf16 on a 2-core Zen 4: 1.13-1.23 s -> 0.81-0.87 s; in
  float32 within noise (1.10-1.49 s either way).
  """
  del native
  x, kernel = residuals
  size, (channels, features) = kernel.shape[0], kernel.shape[-2:]
  g = g.astype(x.dtype)
  cols = im2col(x, size)
  d_kernel = grouped_matmul_kernel_grad(cols.reshape(len(x), -1, cols.shape[-1]),
                                        g.reshape(len(x), -1, features))
  taps = list(itertools.product(range(size), repeat=x.ndim - 2))
  # (F, taps * C); a plain .T XLA folds into the dot, whose transposed bf16 operand it then widens
  # to float32 (2654208 x 64 x 96 on a Zen 4: ~70 ms slower).
  kernel_t = kernel.reshape(len(taps), channels, features).transpose(2, 0, 1).reshape(features, -1)
  kernel_t = kernel_t.astype(x.dtype)
  per_tap = dot_f32(g, kernel_t, (((g.ndim - 1,), (0,)), ((), ())))
  per_tap = per_tap.reshape(g.shape[:-1] + (len(taps), channels))
  low = (size - 1) // 2
  d_x = sum(_shift(per_tap[..., t, :], [o - low for o in offsets])
            for t, offsets in enumerate(taps))
  return d_x.astype(x.dtype), d_kernel.reshape(kernel.shape).astype(kernel.dtype)


patch_conv.defvjp(_patch_conv_fwd, _patch_conv_bwd)


class PatchConv(nn.Module):
  """SAME, stride-1 convolution over each patch (`patch_conv`) with `nn.Conv`'s parameters.

  x (M, *spatial, C) -> (M, *spatial, features) in `dtype`, accumulated in float32 and the bias
  added in float32 before rounding (see `common.dense_f32_acc`); `kernel` (k, ..., k, C, features)
  and `bias` (features,) have `nn.Conv`'s shapes and initialisers.
  `train=True` runs the forward pass as the im2col matmul, whose columns the kernel's gradient
  needs anyway (bf16 forward and backward at the size above: 0.81 s against 0.88 s with the
  native forward pass); inference runs the native convolution, twice as fast alone. Same values
  either way.
  """
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    ndim, channels = x.ndim - 2, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size,) * ndim + (channels, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    y = patch_conv(x.astype(self.dtype), kernel.astype(self.dtype), not train)
    return (y + bias).astype(self.dtype)


class PatchCNN(nn.Module):
  """Learned patch embedding: images (B, C, H, W) -> tokens (B, N, dim) in `dtype`.

  Patching is a reshape inside the model: (B, C, H, W) -> (B*N, p, p, C), patches in row-major grid
  order (token = row * grid_w + col), N = (H/p)(W/p). The patches are folded into the batch dim, so
  every patch goes through the same learned weights. `patch_embedding` selects:
    "conv2d": 2-D convs (kernel_size x kernel_size, SAME, ReLU) with `features` channels over each
              p x p x C patch, flatten, Dense(dim).
    "conv1d": the seed's variant: 1-D convs (kernel_size, SAME, ReLU) over the p*p row-major
              flattened pixels with the C bands as channels, flatten, Dense(dim) (like-with-like
              timing against the seed).
    "linear": ViT-style Dense(dim) of the flattened p*p*C patch (no convolution).
  The convolutions pad each patch with zeros (they never see a neighbouring patch); see
  `PatchConv` (the parameters of `nn.Conv`; `train` picks how it computes, not what).
  """
  patch_size: int = 16
  dim: int = 256
  patch_embedding: str = "conv2d"
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_patch_embedding(self.patch_embedding)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    batch, bands, height, width = images.shape
    grid_h, grid_w = patch_grid((height, width), self.patch_size)
    p = self.patch_size
    x = images.astype(self.dtype).reshape(batch, bands, grid_h, p, grid_w, p)
    x = x.transpose(0, 2, 4, 3, 5, 1).reshape(batch * grid_h * grid_w, p, p, bands)
    if self.patch_embedding == "conv1d":
      x = x.reshape(batch * grid_h * grid_w, p * p, bands)
    if self.patch_embedding in ("conv2d", "conv1d"):
      for i, features in enumerate(self.features):
        x = PatchConv(features, self.kernel_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"conv_{i}")(x, train=train)
        x = nn.relu(x)
    x = x.reshape(batch, grid_h * grid_w, -1)
    return Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


class SpectrumDecoder(nn.Module):
  """Summary token (B, D) -> (spectrum (B, num_pixels) float32, log_norm (B,) float32).

  Dense(hidden) -> ReLU -> Dense(num_pixels): the normalised spectrum (flux / norm, dimensionless);
  a Dense(1) on the same hidden features predicts log10(norm / (1e-17 erg/s/cm^2/Angstrom)). Both
  output layers compute in float32 (small, and a bf16 spectrum would carry ~0.4% rounding error).
  """
  num_pixels: int = NUM_PIXELS
  hidden: int = 2048
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, summary: jax.Array) -> Tuple[jax.Array, jax.Array]:
    h = Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(summary)
    h = nn.relu(h)
    spectrum = nn.Dense(self.num_pixels, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="spectrum")(h)
    log_norm = nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype, name="log_norm")(h)
    return spectrum, log_norm[:, 0]


class RedshiftHead(nn.Module):
  """Summary token (B, D) -> logits (B, num_bins) float32 over redshift bins (see `z_bin_centers`).

  Dense(hidden or D) -> GELU -> Dense(num_bins); softmax of the logits is the redshift PDF
  (classification as in Pasquet et al. 2019).
  """
  num_bins: int = DEFAULT_NUM_Z_BINS
  hidden: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, summary: jax.Array) -> jax.Array:
    h = Dense(self.hidden or summary.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
              name="hidden")(summary)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(self.num_bins, dtype=jnp.float32, param_dtype=self.param_dtype,
                    name="logits")(h)


def z_bin_centers(num_bins: int = DEFAULT_NUM_Z_BINS, z_max: float = DEFAULT_Z_MAX) -> np.ndarray:
  """Centres of `num_bins` equal-width bins tiling [0, z_max], shape (num_bins,), float32."""
  width = z_max / num_bins
  return ((np.arange(num_bins, dtype=np.float64) + 0.5) * width).astype(np.float32)


def z_pdf_stats(logits: jax.Array, centers: jax.Array) -> Dict[str, jax.Array]:
  """Redshift PDF summaries of logits (B, num_bins) on bin centres (num_bins,).

  Returns a float32 dict: `pdf` (B, num_bins) = softmax(logits) (sums to 1), `mean` (B,) =
  sum(pdf * z), `mode` (B,) = centre of the argmax bin, `std` (B,) = sqrt(sum(pdf * (z - mean)^2)).
  """
  pdf = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  centers = jnp.asarray(centers, jnp.float32)
  mean = jnp.sum(pdf * centers, axis=-1)
  mode = centers[jnp.argmax(pdf, axis=-1)]
  std = jnp.sqrt(jnp.sum(pdf * (centers - mean[:, None]) ** 2, axis=-1))
  return dict(pdf=pdf, mean=mean, mode=mode, std=std)


class Astra(nn.Module):
  """The full model; defaults are the seed's (dim 1280, 6 layers, 8 heads, 16-pixel patches).

  `__call__(images (B, bands, H, W), *, train, return_attention=False)` returns a dict of float32:
    spectrum (B, num_pixels): the normalised spectrum (flux / norm),
    log_norm (B,): log10(norm / (1e-17 erg/s/cm^2/Angstrom)),
    z_logits (B, num_z_bins): logits over `z_bin_centers(num_z_bins, z_max)`,
    attention (B, num_heads, H/p, W/p), only if return_attention: the last block's attention of the
      summary token over the patch grid (for maps overlaid on the images).
  Dropout (train=True only) draws from the "dropout" rng collection. Every block's full attention
  weights (B, num_heads, N+1, N+1) are also sown, as a 1-tuple, at
  `intermediates/encoder/block_{i}/attention_weights` (pass `mutable=["intermediates"]`); without
  it the last block computes the summary token alone (the outputs are the same either way).
  `dtype` is the compute dtype (bf16 matmuls accumulate in float32), `param_dtype` the parameter
  dtype; outputs are float32 either way.
  """
  patch_size: int = 16
  dim: int = 1280
  num_layers: int = 6
  num_heads: int = 8
  mlp_ratio: int = 4
  dropout: float = 0.1
  decoder_hidden: int = 2048
  num_pixels: int = NUM_PIXELS
  num_z_bins: int = DEFAULT_NUM_Z_BINS
  z_max: float = DEFAULT_Z_MAX
  patch_embedding: str = "conv2d"
  cnn_features: Sequence[int] = (32, 64)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_patch_embedding(self.patch_embedding)
    super().__post_init__()

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any], dtype: Any = None) -> "Astra":
    """Builds from a dict/ConfigDict whose keys are a subset of the fields; unknown keys raise.

    `dtype` (a dtype or "float32"/"bfloat16"), if given, overrides the config's compute dtype.
    """
    if hasattr(model_config, "to_dict"):
      model_config = model_config.to_dict()
    kwargs = dict(model_config)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise ValueError(f"unknown Astra model config keys {unknown}; allowed: {sorted(fields)}")
    if dtype is not None:
      kwargs["dtype"] = dtype
    for key in ("dtype", "param_dtype"):
      if key in kwargs:
        kwargs[key] = canonical_dtype(kwargs[key])
    if "cnn_features" in kwargs:
      kwargs["cnn_features"] = tuple(kwargs["cnn_features"])
    return cls(**kwargs)

  def z_centers(self) -> np.ndarray:
    """Redshift bin centres (num_z_bins,) float32 that `z_logits` refer to."""
    return z_bin_centers(self.num_z_bins, self.z_max)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool,
               return_attention: bool = False) -> Dict[str, jax.Array]:
    grid_shape = patch_grid(images.shape[2:], self.patch_size)
    tokens = PatchCNN(self.patch_size, self.dim, self.patch_embedding, tuple(self.cnn_features),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(images, train)
    # The heads read the summary token only: unless every block's attention weights are being
    # collected, the last block computes the summary token alone (same outputs, fewer FLOPs).
    _, summary, attention = TransformerEncoder(
        self.num_layers, self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, name="encoder")(
            tokens, grid_shape, train=train,
            summary_only=not self.is_mutable_collection("intermediates"))
    spectrum, log_norm = SpectrumDecoder(self.num_pixels, self.decoder_hidden, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name="decoder")(summary)
    z_logits = RedshiftHead(self.num_z_bins, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="redshift")(summary)
    outputs = dict(spectrum=spectrum, log_norm=log_norm, z_logits=z_logits)
    if return_attention:
      outputs["attention"] = attention
    return outputs
