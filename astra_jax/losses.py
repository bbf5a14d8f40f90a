"""ASTRA losses: normalised-spectrum MSE, log-normalisation MSE, redshift cross-entropy.

Units: `flux` is in 1e-17 erg/s/cm^2/Angstrom on the 4000-pixel grid of `astra_jax.grid`; `weight`
is a per-pixel weight >= 0 (inverse variance in 1/flux^2 units, or 0/1 masks); 0 marks a bad pixel,
whose flux value is ignored (it may be NaN).

Distributed design. Every loss is a masked mean over the examples that count (galaxies with at least
one weighted pixel for the spectrum and normalisation terms, galaxies with has_z for the redshift
term), so examples that do not count do not dilute it. A mean of per-device means is not the global
mean when devices hold different numbers of counting examples, so `loss_terms` returns each part
as a (sum, count) pair of float32 scalars; `combine_terms` turns them into means and the weighted
total.
Exact ways to shard a batch over devices (all equal to one device on the whole batch, up to float
summation order):
  0. jit over a batch sharded with NamedSharding, no explicit collectives: `total_loss(...)` as is.
  1. Metrics / values: `terms = lax.psum(loss_terms(...), axis)`; `combine_terms(terms, ...)`.
  2. Gradients inside pmap or shard_map: `total_loss(..., axis_name=axis, reduction=...)`. Counts
     (which carry no gradient) are psum'd over `axis`; each device returns its share of the global
     mean, local_sum / global_count, scaled by the number of devices when reduction="pmean".
       reduction="pmean": per-device gradients that the trainer averages, as with pmap or
         shard_map(check_vma=False): `lax.pmean` of the loss AND of the grads gives the exact
         values.
       reduction="psum": shard_map(check_vma=True), where JAX itself sums the gradients w.r.t.
         replicated params over the axis: use those grads as they are; `lax.psum` the loss value.
     Picking the wrong one scales the gradients by the number of devices.
     `parts` are already the global means.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from astra_jax.models.astra import DEFAULT_Z_MAX, amplitude_bin_centers, z_bin_centers

#: Floor of the per-galaxy normalisation, in 1e-17 erg/s/cm^2/Angstrom: keeps log10(norm) finite
#: and the division safe for noise-dominated galaxies whose mean flux is ~0 or negative.
NORM_FLOOR = 1e-3

Terms = Dict[str, Tuple[jax.Array, jax.Array]]
#: Penalties of the log-normalisation error d = log_norm - log10(norm), in dex: "squared" d^2
#: (fits the conditional mean), "absolute" |d| (the conditional median, as the flux metrics are
#: medians); "binned": the cross-entropy of a binned amplitude head's PDF (`Astra.amplitude_bins`)
#: at the true correction log10(norm) - log_norm_anchor, a PDF that can hold both peaks of
#: log10(norm / aperture flux), one per fiber size.
NORM_LOSSES = ("squared", "absolute", "binned")


def normalise_spectrum(flux: jax.Array, weight: jax.Array,
                       floor: float = NORM_FLOOR) -> Tuple[jax.Array, jax.Array]:
  """Divides each spectrum by its mean flux over valid pixels.

  Args:
    flux: (B, P) flux in 1e-17 erg/s/cm^2/Angstrom.
    weight: (B, P) weights; a pixel is valid where weight > 0 (its size does not matter here).
  Returns:
    flux_norm: (B, P) float32 flux / norm, set to 0 at invalid pixels (so NaN fluxes there vanish).
    norm: (B,) float32 = max(mean of flux over the valid pixels, floor), in
      1e-17 erg/s/cm^2/Angstrom; `floor` for a galaxy with no valid pixel. The model's `log_norm`
      head predicts log10(norm).
  """
  valid = weight > 0
  flux = jnp.where(valid, flux.astype(jnp.float32), 0.0)
  count = jnp.sum(valid, axis=-1)
  mean = jnp.sum(flux, axis=-1) / jnp.maximum(count, 1)
  norm = jnp.maximum(mean, floor)
  return jnp.where(valid, flux / norm[:, None], 0.0), norm


def denormalise(spectrum: jax.Array, log_norm: jax.Array) -> jax.Array:
  """(spectrum (B, P), log_norm (B,)) -> flux (B, P) float32 in 1e-17 erg/s/cm^2/Angstrom."""
  return spectrum.astype(jnp.float32) * (10.0 ** log_norm.astype(jnp.float32))[:, None]


def spectrum_loss(pred: jax.Array, flux_norm: jax.Array, weight: jax.Array) -> jax.Array:
  """Per-galaxy weighted MSE sum_p w (pred - true)^2 / sum_p w, shape (B,) float32.

  Dividing by each galaxy's own sum of weights makes every galaxy count equally and makes the
  overall scale of its weights irrelevant; this is why raw ivar (in 1/flux^2 units) can be passed
  even though the ivar of the normalised flux is ivar * norm^2 (a per-galaxy constant that cancels).
  Negative weights count as 0. Galaxies with sum w = 0 get 0 (exclude them from the mean with
  `sum w > 0`, as `loss_terms` does).
  """
  weight = jnp.maximum(weight.astype(jnp.float32), 0.0)
  sq = jnp.where(weight > 0, (pred.astype(jnp.float32) - flux_norm) ** 2, 0.0)
  total = jnp.sum(weight, axis=-1)
  return jnp.sum(weight * sq, axis=-1) / jnp.where(total > 0, total, 1.0)


def z_bin_index(z: jax.Array, centers: jax.Array) -> jax.Array:
  """Index (B,) int32 of the bin whose centre is nearest to z (B,); z beyond the range: end bin."""
  return jnp.argmin(jnp.abs(z[:, None] - centers[None, :]), axis=-1).astype(jnp.int32)


def smoothed_labels(z: jax.Array, centers: jax.Array, sigma: float) -> jax.Array:
  """Gaussian label smoothing in z: (B, K) float32 targets over the bins with `centers` (K,).

  exp(-(centre - z)^2 / (2 sigma^2)) normalised over the bins to sum 1, so it peaks at the bin
  nearest z; sigma (in z) > 0. Neighbouring bins (0.6 / 180 = 0.0033 wide in the default model)
  share the label, which ties the bins' logits together (Pasquet et al. 2019 smooth likewise).
  """
  centers = jnp.asarray(centers, jnp.float32)
  return jax.nn.softmax(-0.5 * ((centers[None, :] - z[:, None]) / sigma) ** 2, axis=-1)


def redshift_loss(z_logits: jax.Array, z: jax.Array, has_z: jax.Array, centers: jax.Array, *,
                  sigma: float = 0.0) -> jax.Array:
  """Per-galaxy cross-entropy of the redshift PDF, shape (B,) float32, 0 where has_z is False.

  Args:
    z_logits: (B, K) logits over bins with centres `centers` (K,) (see `z_bin_centers`).
    z: (B,) true redshift (ignored, may be NaN, where has_z is False).
    has_z: (B,) bool.
    sigma: 0 -> the target is one-hot on the bin containing z (nearest centre; z beyond the range
      goes to the end bin). sigma > 0 -> `smoothed_labels` (a Gaussian in z of std `sigma` at
      the bin centres, normalised to sum 1; the CE minimum is then the target's entropy, not 0).
  Any binned PDF of a scalar is scored the same way (the binned amplitude's, in dex).
  """
  centers = jnp.asarray(centers, jnp.float32)
  z = jnp.where(has_z, z.astype(jnp.float32), 0.0)
  log_p = jax.nn.log_softmax(z_logits.astype(jnp.float32), axis=-1)
  if sigma > 0:
    ce = -jnp.sum(smoothed_labels(z, centers, sigma) * log_p, axis=-1)
  else:
    ce = -jnp.take_along_axis(log_p, z_bin_index(z, centers)[:, None], axis=-1)[:, 0]
  return jnp.where(has_z, ce, 0.0)


def loss_terms(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
               z_centers: Optional[Any] = None, z_sigma: float = 0.0,
               norm_loss: str = "squared", norm_sigma: float = 0.0) -> Terms:
  """Per-part (sum over counting examples, number of counting examples) float32 scalars.

  outputs: `Astra` outputs (spectrum (B, P), log_norm (B,), z_logits (B, K)).
  batch: flux (B, P), weight (B, P), z (B,), has_z (B,) bool.
  z_centers: (K,) bin centres; None -> `z_bin_centers(K, DEFAULT_Z_MAX)` (pass the model's
    `z_centers()` if it was built with another z_max).
  Parts: "spectrum": `spectrum_loss` over galaxies with sum(weight) > 0; "norm": the `norm_loss`
  penalty (NORM_LOSSES) of log_norm - log10(norm) over the same galaxies ("binned": the
  cross-entropy of outputs' log_norm_logits at log10(norm) - log_norm_anchor, labels smoothed by
  `norm_sigma` dex); "redshift": `redshift_loss` over galaxies with has_z.
  """
  if norm_loss not in NORM_LOSSES:
    raise ValueError(f"norm_loss must be one of {NORM_LOSSES}, got {norm_loss!r}")
  flux_norm, norm = normalise_spectrum(batch["flux"], batch["weight"])
  has_spec = jnp.sum(jnp.maximum(batch["weight"], 0), axis=-1) > 0
  spec = spectrum_loss(outputs["spectrum"], flux_norm, batch["weight"])
  if norm_loss == "binned":
    if "log_norm_logits" not in outputs:
      raise ValueError("norm_loss='binned' needs a model with amplitude_bins > 0 "
                       "(outputs log_norm_logits and log_norm_anchor)")
    logits = outputs["log_norm_logits"]
    correction = jnp.log10(norm) - lax.stop_gradient(outputs["log_norm_anchor"])
    penalty = redshift_loss(logits, correction, has_spec,
                            amplitude_bin_centers(logits.shape[-1]), sigma=norm_sigma)
  else:
    error = outputs["log_norm"].astype(jnp.float32) - jnp.log10(norm)
    penalty = error ** 2 if norm_loss == "squared" else jnp.abs(error)
  norm_term = jnp.where(has_spec, penalty, 0.0)
  z_logits = outputs["z_logits"]
  if z_centers is None:
    z_centers = z_bin_centers(z_logits.shape[-1], DEFAULT_Z_MAX)
  has_z = batch["has_z"].astype(bool)
  z_ce = redshift_loss(z_logits, batch["z"], has_z, z_centers, sigma=z_sigma)
  n_spec = jnp.sum(has_spec).astype(jnp.float32)
  return dict(spectrum=(jnp.sum(spec), n_spec), norm=(jnp.sum(norm_term), n_spec),
              redshift=(jnp.sum(z_ce), jnp.sum(has_z).astype(jnp.float32)))


def combine_terms(terms: Terms, *, z_weight: float,
                  norm_weight: float) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """(sum, count) terms -> (spectrum + norm_weight * norm + z_weight * redshift, part means).

  A part with count 0 has mean 0 (and contributes no gradient).
  """
  parts = {name: s / jnp.maximum(c, 1.0) for name, (s, c) in terms.items()}
  return weighted_sum(parts, z_weight=z_weight, norm_weight=norm_weight), parts


def weighted_sum(parts: Mapping[str, jax.Array], *, z_weight: float,
                 norm_weight: float) -> jax.Array:
  """spectrum + norm_weight * norm + z_weight * redshift of per-part values."""
  return parts["spectrum"] + norm_weight * parts["norm"] + z_weight * parts["redshift"]


def device_shares(terms: Terms, axis_name: str, reduction: str = "pmean") -> Dict[str, jax.Array]:
  """This device's share of each part's global mean, inside pmap/shard_map over `axis_name`:
  local sum / global count, times the number of devices for reduction="pmean" (see the module
  docstring). Counts are psum'd without gradient."""
  if reduction not in ("pmean", "psum"):
    raise ValueError(f"reduction must be 'pmean' or 'psum', got {reduction!r}")
  scale = lax.psum(1, axis_name) if reduction == "pmean" else 1
  return {k: s * scale / jnp.maximum(lax.psum(lax.stop_gradient(c), axis_name), 1.0)
          for k, (s, c) in terms.items()}


def total_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
               z_weight: float, norm_weight: float, z_centers: Optional[Any] = None,
               z_sigma: float = 0.0, norm_loss: str = "squared", norm_sigma: float = 0.0,
               axis_name: Optional[str] = None,
               reduction: str = "pmean") -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Scalar float32 loss and its parts {"spectrum", "norm", "redshift"} (masked means).

  loss = spectrum + norm_weight * norm + z_weight * redshift. axis_name=None: the loss of this
  batch. axis_name given (inside pmap/shard_map over a sharded batch): this device's share of the
  global loss, for `reduction` "pmean" (then pmean loss and grads) or "psum" (shard_map with
  check_vma=True); `parts` are the global means (no gradient). See the module docstring.
  """
  if reduction not in ("pmean", "psum"):
    raise ValueError(f"reduction must be 'pmean' or 'psum', got {reduction!r}")
  terms = loss_terms(outputs, batch, z_centers=z_centers, z_sigma=z_sigma, norm_loss=norm_loss,
                     norm_sigma=norm_sigma)
  if axis_name is None:
    return combine_terms(terms, z_weight=z_weight, norm_weight=norm_weight)
  loss = weighted_sum(device_shares(terms, axis_name, reduction), z_weight=z_weight,
                      norm_weight=norm_weight)
  global_terms = {k: (lax.psum(lax.stop_gradient(s), axis_name),
                      lax.psum(lax.stop_gradient(c), axis_name)) for k, (s, c) in terms.items()}
  _, parts = combine_terms(global_terms, z_weight=z_weight, norm_weight=norm_weight)
  return loss, parts

