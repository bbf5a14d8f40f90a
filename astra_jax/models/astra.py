"""ASTRA: multi-band image -> (normalised spectrum, log10 normalisation, redshift PDF) transformer.

images (B, bands, H, W) -> PatchCNN -> (B, N, dim) patch tokens, N = (H/p)(W/p)
  [+ aperture_fluxes (B, bands, 5) -> PhotometryEmbed -> one photometry token, `photometry_token`]
  -> TransformerEncoder (2-D sin-cos positions, appended summary token, pre-norm blocks)
  -> summary token (B, dim) [concatenated with the photometry embedding, `photometry_to_heads`]
  -> SpectrumDecoder (spectrum (B, num_pixels), log_norm (B,))
                            -> RedshiftHead (z_logits (B, num_z_bins)).
The spectrum is on the fixed grid of `astra_jax.grid` (4000 pixels), divided by the per-galaxy
normalisation of `astra_jax.losses.normalise_spectrum`; `log_norm` predicts log10 of that
normalisation, so `losses.denormalise(spectrum, log_norm)` gives flux in 1e-17 erg/s/cm^2/Angstrom.
`amplitude` says what the `log_norm` head predicts: log10(norm) itself ("head"), or a correction
to the amplitude that the galaxy's measured r-band 3 arcsec aperture flux implies ("aperture":
for a flat f_nu, `aperture_log_norm`; "aperture_spectrum": for the model's own predicted spectrum
shape, `spectrum_log_norm`).

`aperture_fluxes` are `photometry.aperture_fluxes` of the same cutouts (nanomaggies, bands x
`photometry.DIAMETERS_ARCSEC`): datasets store them, and prediction measures them on the FITS
files by that same function.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
from flax.typing import Dtype
import jax
import jax.numpy as jnp
import numpy as np

from astra_jax import photometry
from astra_jax.grid import NUM_PIXELS
from astra_jax.models.transformer import TransformerEncoder

PATCH_EMBEDDINGS = ("conv2d", "conv1d", "linear")
DEFAULT_NUM_Z_BINS = 180
DEFAULT_Z_MAX = 0.6
#: (band, aperture) of `aperture_fluxes` that anchors the amplitude: r in the 3 arcsec aperture,
#: the SDSS fiber's diameter.
REFERENCE_APERTURE = (photometry.R_BAND, photometry.DIAMETERS_ARCSEC.index(3.0))
#: What the `log_norm` head predicts (see `Astra.amplitude`).
AMPLITUDES = ("head", "aperture", "aperture_spectrum")
#: The range (dex) of log_norm corrections that a binned amplitude head's bins tile
#: (`amplitude_bin_centers`). Against the "aperture" and "aperture_spectrum" anchors the mock's
#: corrections lie in [-0.5, 0] once the spectrum is learnt; the floor of an untrained spectrum's
#: r flux puts them near -1.4.
AMPLITUDE_RANGE_DEX = (-1.6, 0.4)
#: Point estimates of a binned amplitude PDF (see `Astra.amplitude_estimate`).
AMPLITUDE_ESTIMATES = ("mode", "median", "mean")
#: Floor of the predicted normalised spectrum's r-band flux in `spectrum_log_norm`, nanomaggies
#: per unit norm: a tenth of a flat f_lambda spectrum's (1 / 0.283), so an untrained or
#: nonsensical spectrum cannot send log10 to -inf.
SPECTRUM_R_FLOOR_NMGY = 0.35
#: f_lambda of 1 nanomaggy at the PS1 r pivot wavelength (6156 Angstrom), in
#: 1e-17 erg/s/cm^2/Angstrom: 3.631e-29 erg/s/cm^2/Hz x c / lambda^2.
NMGY_TO_FLAM_R = 0.2873
#: `fiber_input`: the amplitude head reads (fiber_diameter - this) arcsec, +-0.5 for the SDSS
#: 3 and BOSS 2 arcsec fibers.
FIBER_REFERENCE_ARCSEC = 2.5


def patch_grid(image_hw: Tuple[int, int], patch_size: int) -> Tuple[int, int]:
  """(grid_h, grid_w) = (H / patch_size, W / patch_size); (288, 288), 16 -> (18, 18): 324 tokens."""
  height, width = image_hw
  if height % patch_size or width % patch_size:
    raise ValueError(f"image size {(height, width)} is not divisible by patch_size={patch_size}")
  return height // patch_size, width // patch_size


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """`jnp.dtype` of a dtype or its name ("float32", "bfloat16", "bf16", "fp32")."""
  aliases = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32"}
  if isinstance(dtype, str):
    dtype = aliases.get(dtype, dtype)
  return jnp.dtype(dtype)


def _check_patch_embedding(value: str) -> None:
  if value not in PATCH_EMBEDDINGS:
    raise ValueError(f"patch_embedding must be one of {PATCH_EMBEDDINGS}, got {value!r}")


class PatchCNN(nn.Module):
  """Learned patch embedding: images (B, C, H, W) -> tokens (B, N, dim) in `dtype`.

  Patching is a reshape inside the model: (B, C, H, W) -> (B*N, p, p, C), patches in row-major grid
  order (token = row * grid_w + col), N = (H/p)(W/p). The patches are folded into the batch dim, so
  every patch goes through the same learned weights. `patch_embedding` selects:
    "conv2d": `nn.Conv` (kernel_size x kernel_size, SAME, ReLU) layers with `features` channels
              over each p x p x C patch, flatten, Dense(dim).
    "conv1d": the seed's variant: `nn.Conv` (kernel_size, SAME, ReLU) layers over the p*p
              row-major flattened pixels with the C bands as channels, flatten, Dense(dim).
    "linear": ViT-style Dense(dim) of the flattened p*p*C patch (no convolution).
  SAME padding pads each patch with zeros: a convolution never sees a neighbouring patch.
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
  def __call__(self, images: jax.Array) -> jax.Array:
    batch, bands, height, width = images.shape
    grid_h, grid_w = patch_grid((height, width), self.patch_size)
    p = self.patch_size
    x = images.astype(self.dtype).reshape(batch, bands, grid_h, p, grid_w, p)
    x = x.transpose(0, 2, 4, 3, 5, 1).reshape(batch * grid_h * grid_w, p, p, bands)
    if self.patch_embedding == "conv1d":
      x = x.reshape(batch * grid_h * grid_w, p * p, bands)
    if self.patch_embedding in ("conv2d", "conv1d"):
      kernel_size = (self.kernel_size,) * (x.ndim - 2)
      for i, features in enumerate(self.features):
        x = nn.Conv(features, kernel_size, padding="SAME", dtype=self.dtype,
                    param_dtype=self.param_dtype, name=f"conv_{i}")(x)
        x = nn.relu(x)
    x = x.reshape(batch, grid_h * grid_w, -1)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


def aperture_log_norm(aperture_fluxes: jax.Array) -> jax.Array:
  """(B,) float32 log10 of the spectrum normalisation that the r-band 3 arcsec aperture flux
  implies for a flat f_nu: log10(NMGY_TO_FLAM_R x max(f_r, photometry.FLUX_FLOOR_NMGY)).

  The fiber sees what this aperture sees, so the `log_norm` head only learns the colour- and
  seeing-dependent correction to it, where it otherwise had to infer the amplitude from pixels.
  """
  band, aperture = REFERENCE_APERTURE
  flux = jnp.nan_to_num(aperture_fluxes[:, band, aperture].astype(jnp.float32))
  return jnp.log10(NMGY_TO_FLAM_R * jnp.maximum(flux, photometry.FLUX_FLOOR_NMGY))


def spectrum_log_norm(aperture_fluxes: jax.Array, spectrum: jax.Array) -> jax.Array:
  """(B,) float32 log10 of the spectrum normalisation at which the normalised `spectrum`
  (B, num_pixels) has the r-band flux of the r 3 arcsec aperture in `aperture_fluxes`:
  log10(max(f_r, FLUX_FLOOR_NMGY)) - log10(max(r nanomaggies of `spectrum`, SPECTRUM_R_FLOOR_NMGY)),
  the spectrum's flux through `photometry.band_nmgy_weights("r")`.

  The flux scale then follows the measured photometry and the predicted colour, where
  `aperture_log_norm` assumes a flat f_nu. No gradient flows into `spectrum` here, so the
  normalisation loss does not bend the spectrum's shape.
  """
  band, aperture = REFERENCE_APERTURE
  flux = jnp.nan_to_num(aperture_fluxes[:, band, aperture].astype(jnp.float32))
  weights = jnp.asarray(photometry.band_nmgy_weights("r"), jnp.float32)
  r_per_norm = jax.lax.stop_gradient(spectrum.astype(jnp.float32)) @ weights
  return (jnp.log10(jnp.maximum(flux, photometry.FLUX_FLOOR_NMGY))
          - jnp.log10(jnp.maximum(r_per_norm, SPECTRUM_R_FLOOR_NMGY)))


class PhotometryEmbed(nn.Module):
  """Aperture fluxes (B, 5, 5) nanomaggies (grizy x `photometry.DIAMETERS_ARCSEC`) -> (B, dim).

  Features: the photometric baselines' `photometry.features` (B, 23: colours in four apertures,
  large-aperture r magnitudes, concentration, curve of growth; mag), standardised as
  (x - `mean`) / `scale` with the training split's statistics (`photometry.feature_statistics`,
  which training stores in the model config; empty: no standardisation); then
  Dense(dim) -> GELU -> Dense(dim). Without standardisation the colours' 0.1-mag spread sits on
  offsets of ~1 mag and an MLP with ASTRA's budget reached redshift sigma_MAD ~0.022; with it,
  ~0.012 (docs/science.md, lever (i)). Catalogue photometry as one more input token (images and
  photometry together beat either alone: GaZNet, Li et al. 2022).
  """
  dim: int
  mean: Sequence[float] = ()
  scale: Sequence[float] = ()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, aperture_fluxes: jax.Array) -> jax.Array:
    x = photometry.features(aperture_fluxes, xp=jnp)
    if len(self.mean) or len(self.scale):
      if not len(self.mean) == len(self.scale) == x.shape[-1]:
        raise ValueError(f"photometry mean and scale need {x.shape[-1]} values each (one per "
                         f"photometry.features column), got {len(self.mean)} and "
                         f"{len(self.scale)}")
      x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.scale, jnp.float32)
    dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    return dense("out")(nn.gelu(dense("hidden")(x), approximate=False))


class SpectrumDecoder(nn.Module):
  """Summary token (B, D) -> (spectrum (B, num_pixels) float32, log_norm (B,) float32).

  Dense(hidden) -> ReLU -> Dense(num_pixels): the normalised spectrum (flux / norm, dimensionless);
  with `log_norm` a Dense(1) on the same hidden features predicts log10(norm / (1e-17
  erg/s/cm^2/Angstrom)), else log_norm is None. Both output layers compute in float32 (small, and
  a bf16 spectrum would carry ~0.4% rounding error).
  """
  num_pixels: int = NUM_PIXELS
  hidden: int = 2048
  log_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, summary: jax.Array) -> Tuple[jax.Array, jax.Array]:
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="hidden")(summary)
    h = nn.relu(h)
    spectrum = nn.Dense(self.num_pixels, dtype=jnp.float32, param_dtype=self.param_dtype,
                        name="spectrum")(h)
    if not self.log_norm:
      return spectrum, None
    log_norm = nn.Dense(1, dtype=jnp.float32, param_dtype=self.param_dtype, name="log_norm")(h)
    return spectrum, log_norm[:, 0]


class RedshiftHead(nn.Module):
  """Summary token (B, D) -> logits (B, num_bins) float32 over redshift bins (see `z_bin_centers`).

  Dense(hidden or D) -> GELU -> Dense(num_bins); softmax of the logits is the redshift PDF
  (classification as in Pasquet et al. 2019). The binned amplitude (`Astra.amplitude_bins`) is
  the same head over its own bins.
  """
  num_bins: int = DEFAULT_NUM_Z_BINS
  hidden: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, summary: jax.Array) -> jax.Array:
    h = nn.Dense(self.hidden or summary.shape[-1], dtype=self.dtype,
                 param_dtype=self.param_dtype, name="hidden")(summary)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(self.num_bins, dtype=jnp.float32, param_dtype=self.param_dtype,
                    name="logits")(h)


def z_bin_centers(num_bins: int = DEFAULT_NUM_Z_BINS, z_max: float = DEFAULT_Z_MAX) -> np.ndarray:
  """Centres of `num_bins` equal-width bins tiling [0, z_max], shape (num_bins,), float32."""
  width = z_max / num_bins
  return ((np.arange(num_bins, dtype=np.float64) + 0.5) * width).astype(np.float32)


def amplitude_bin_centers(num_bins: int) -> np.ndarray:
  """Centres (num_bins,) float32, in dex, of equal-width bins tiling AMPLITUDE_RANGE_DEX."""
  low, high = AMPLITUDE_RANGE_DEX
  width = (high - low) / num_bins
  return (low + (np.arange(num_bins, dtype=np.float64) + 0.5) * width).astype(np.float32)


def z_pdf_stats(logits: jax.Array, centers: jax.Array) -> Dict[str, jax.Array]:
  """Redshift PDF summaries of logits (B, num_bins) on bin centres (num_bins,); the same for any
  PDF over equal-width bins (the binned amplitude's too).

  Returns a float32 dict: `pdf` (B, num_bins) = softmax(logits) (sums to 1), `mean` (B,) =
  sum(pdf * z), `mode` (B,) = centre of the argmax bin, `median` (B,) = where the CDF reaches 1/2
  (the PDF uniform within each equal-width bin, as `baselines.pdf_median`): the point estimate,
  `std` (B,) = sqrt(sum(pdf * (z - mean)^2)).
  """
  pdf = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  centers = jnp.asarray(centers, jnp.float32)
  mean = jnp.sum(pdf * centers, axis=-1)
  mode = centers[jnp.argmax(pdf, axis=-1)]
  std = jnp.sqrt(jnp.sum(pdf * (centers - mean[:, None]) ** 2, axis=-1))
  return dict(pdf=pdf, mean=mean, mode=mode, median=pdf_median(pdf, centers), std=std)


def pdf_median(pdf: jax.Array, centers: jax.Array) -> jax.Array:
  """Median (B,) float32 of PDFs (B, K) over equal-width bins with `centers` (K,), linear within
  the bin where the CDF crosses 1/2."""
  width = (centers[-1] - centers[0]) / max(centers.shape[0] - 1, 1)
  cdf = jnp.cumsum(pdf, axis=-1)
  cdf = cdf / cdf[:, -1:]
  j = jnp.argmax(cdf >= 0.5, axis=-1)
  above = jnp.take_along_axis(cdf, j[:, None], axis=-1)[:, 0]
  mass = jnp.take_along_axis(pdf, j[:, None], axis=-1)[:, 0] / pdf.sum(-1)
  below = above - mass
  frac = jnp.where(mass > 0, (0.5 - below) / jnp.where(mass > 0, mass, 1.0), 0.5)
  return centers[j] - 0.5 * width + jnp.clip(frac, 0.0, 1.0) * width


class Astra(nn.Module):
  """The full model; defaults are the seed's (dim 1280, 6 layers, 8 heads, 16-pixel patches).

  `__call__(images (B, bands, H, W), aperture_fluxes (B, bands, 5) or None,
  fiber_diameter (B,) arcsec or None, *, train, return_attention=False)` returns a dict of
  float32:
    spectrum (B, num_pixels): the normalised spectrum (flux / norm),
    log_norm (B,): log10(norm / (1e-17 erg/s/cm^2/Angstrom)): the head's output, plus
      `aperture_log_norm(aperture_fluxes)` with amplitude="aperture" or
      `spectrum_log_norm(aperture_fluxes, spectrum)` with amplitude="aperture_spectrum",
    log_norm_logits (B, amplitude_bins), log_norm_anchor (B,), only if amplitude_bins > 0: the
      head's PDF of the correction (dex) over `amplitude_centers()`, and the anchor it corrects;
      log_norm is then the anchor plus the PDF's `amplitude_estimate`,
    z_logits (B, num_z_bins): logits over `z_bin_centers(num_z_bins, z_max)`,
    attention (B, num_heads, H/p, W/p), only if return_attention: the last block's attention of the
      summary token over the patch grid (for maps overlaid on the images).
  Dropout (train=True only) draws from the "dropout" rng collection. Every block's full attention
  weights (B, num_heads, N+1, N+1) float32 are also sown, as a 1-tuple, at
  `intermediates/encoder/block_{i}/attention_weights` (pass `mutable=["intermediates"]`); without
  it the last block computes the summary token alone (same outputs in evaluation; in training its
  dropout masks are drawn for that row alone), and attention runs through
  `jax.nn.dot_product_attention`. `dtype` is the compute dtype of the stock layers (bf16: params
  float32, matmuls in bf16), `param_dtype` the parameter dtype; outputs are float32 either way.
  `photometry_token`: `PhotometryEmbed(aperture_fluxes)` joins the patch tokens as one more token;
  `photometry_to_heads`: that embedding (one module for both) is concatenated to the summary token
  the heads read (B, 2 dim). Either, and either aperture amplitude, need `aperture_fluxes`
  (`uses_photometry`). `photometry_mean`, `photometry_scale` (23 each, mag) standardise the
  embedding's features (`PhotometryEmbed`); `train.train_and_evaluate` measures them on the
  training split and stores them in the run's config.json.
  `amplitude_bins` > 0: the amplitude head (a `RedshiftHead` of its own, "amplitude", in place
  of the decoder's Dense(1)) predicts a PDF over that many bins of the correction to its anchor
  (trained by cross-entropy, `losses.loss_terms` with norm_loss="binned"), and log_norm is its
  `amplitude_estimate` ("median", "mode" or "mean" of that PDF). The fiber's
  share of the aperture light is bimodal (SDSS 3 arcsec and BOSS 2 arcsec fibers, 0.24 dex apart
  on the mock), and which fiber a galaxy got is barely predictable from its images: a PDF can
  hold both modes where a regression of the mean or median is one number that must land
  between or in them (docs/science.md, lever (j)).
  `fiber_input` (needs amplitude_bins): the amplitude head also reads `fiber_diameter`, the fiber
  whose light the spectrum is (the dataset's, or the one a user asks `predict` for): a learnt
  vector times (fiber_diameter - FIBER_REFERENCE_ARCSEC) is added to its input. The redshift
  head and the spectrum decoder do not read it (which fiber took a spectrum depends on z in the
  surveys' targeting, a selection a redshift estimate must not use).
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
  photometry_token: bool = False
  photometry_to_heads: bool = False
  photometry_mean: Sequence[float] = ()
  photometry_scale: Sequence[float] = ()
  amplitude: str = "head"
  amplitude_bins: int = 0
  amplitude_estimate: str = "median"
  fiber_input: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_patch_embedding(self.patch_embedding)
    if self.amplitude not in AMPLITUDES:
      raise ValueError(f"amplitude must be one of {AMPLITUDES}, got {self.amplitude!r}")
    if self.amplitude_bins and self.amplitude == "head":
      raise ValueError("amplitude_bins > 0 bins a correction to an aperture anchor: it needs "
                       "amplitude 'aperture' or 'aperture_spectrum', not 'head'")
    if self.fiber_input and not self.amplitude_bins:
      raise ValueError("fiber_input feeds the fiber to the binned amplitude head: it needs "
                       "amplitude_bins > 0")
    if self.amplitude_estimate not in AMPLITUDE_ESTIMATES:
      raise ValueError(f"amplitude_estimate must be one of {AMPLITUDE_ESTIMATES}, "
                       f"got {self.amplitude_estimate!r}")
    super().__post_init__()

  @property
  def uses_photometry(self) -> bool:
    """Whether `__call__` needs `aperture_fluxes`."""
    return self.photometry_token or self.photometry_to_heads or self.amplitude != "head"

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
    for key in ("cnn_features", "photometry_mean", "photometry_scale"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)

  def z_centers(self) -> np.ndarray:
    """Redshift bin centres (num_z_bins,) float32 that `z_logits` refer to."""
    return z_bin_centers(self.num_z_bins, self.z_max)

  def amplitude_centers(self) -> np.ndarray:
    """Correction bin centres (amplitude_bins,) float32, dex, that `log_norm_logits` refer to."""
    return amplitude_bin_centers(self.amplitude_bins)

  @nn.compact
  def __call__(self, images: jax.Array, aperture_fluxes: Optional[jax.Array] = None,
               fiber_diameter: Optional[jax.Array] = None, *, train: bool,
               return_attention: bool = False) -> Dict[str, jax.Array]:
    if self.uses_photometry and aperture_fluxes is None:
      raise ValueError("this model (photometry_token or an aperture amplitude) needs "
                       "aperture_fluxes (B, bands, 5) nanomaggies: photometry.aperture_fluxes")
    if self.fiber_input and fiber_diameter is None:
      raise ValueError("this model (fiber_input) needs fiber_diameter (B,) arcsec: the fiber "
                       "whose light the predicted spectrum is (SDSS 3, BOSS 2)")
    grid_shape = patch_grid(images.shape[2:], self.patch_size)
    tokens = PatchCNN(self.patch_size, self.dim, self.patch_embedding, tuple(self.cnn_features),
                      dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(images)
    extra = photometry = None
    if self.photometry_token or self.photometry_to_heads:
      photometry = PhotometryEmbed(self.dim, tuple(self.photometry_mean),
                                   tuple(self.photometry_scale), dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="photometry")(aperture_fluxes)
    if self.photometry_token:
      extra = photometry[:, None]
    # The heads read the summary token only: unless every block's attention weights are being
    # collected, the last block computes the summary token alone (fewer FLOPs).
    _, summary, attention = TransformerEncoder(
        self.num_layers, self.num_heads, self.mlp_ratio, self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, name="encoder")(
            tokens, grid_shape, train=train, extra_tokens=extra,
            summary_only=not self.is_mutable_collection("intermediates"),
            return_attention=return_attention)
    if self.photometry_to_heads:
      # The heads also read the photometry embedding directly (GaZNet, Li et al. 2022, joins
      # its catalogue branch to the image branch here), not only through attention.
      summary = jnp.concatenate([summary, photometry.astype(summary.dtype)], axis=-1)
    spectrum, head = SpectrumDecoder(self.num_pixels, self.decoder_hidden,
                                     log_norm=not self.amplitude_bins, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name="decoder")(summary)
    if self.amplitude_bins:
      amplitude_input = summary
      if self.fiber_input:
        # The amplitude is the light in the spectrum's fiber: on the mock the 2 arcsec BOSS
        # fiber sees 0.24 dex less of it than the 3 arcsec SDSS one (docs/science.md, lever (k)).
        offset = (jnp.asarray(fiber_diameter, jnp.float32) - FIBER_REFERENCE_ARCSEC)[:, None]
        amplitude_input = summary + nn.Dense(
            summary.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            name="fiber")(offset.astype(summary.dtype))
      # Its own hidden layer: sharing the decoder's cost the spectrum R^2 (docs/science.md).
      head = RedshiftHead(self.amplitude_bins, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="amplitude")(amplitude_input)
    if self.amplitude == "aperture":
      anchor = aperture_log_norm(aperture_fluxes)
    elif self.amplitude == "aperture_spectrum":
      anchor = spectrum_log_norm(aperture_fluxes, spectrum)
    else:
      anchor = jnp.zeros(head.shape[:1], jnp.float32)
    outputs = {}
    if self.amplitude_bins:
      estimate = z_pdf_stats(head, self.amplitude_centers())[self.amplitude_estimate]
      log_norm = anchor + estimate
      outputs.update(log_norm_logits=head, log_norm_anchor=anchor)
    else:
      log_norm = anchor + head
    z_logits = RedshiftHead(self.num_z_bins, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="redshift")(summary)
    outputs.update(spectrum=spectrum, log_norm=log_norm, z_logits=z_logits)
    if return_attention:
      outputs["attention"] = attention
    return outputs
