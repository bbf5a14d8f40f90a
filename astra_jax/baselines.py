"""Baselines that ASTRA must beat, scored by the same metric code (`evaluate.scalar_metrics`).

(a) `MeanSpectrum`: the mean normalised training spectrum, scaled to each galaxy's r-band 3 arcsec
    aperture flux; the redshift is the median training redshift.
(b) `ColourKNN`: k nearest training neighbours in aperture colours (g-r, r-i, i-z, z-y) and
    r magnitude, all measured on the images; the neighbours' mean normalised spectrum, scaled
    like (a) by their median spectrum-to-aperture flux ratio, and their median redshift.
Both see only what ASTRA sees at prediction time: the images (through their aperture photometry).
"""

from __future__ import annotations

import numpy as np

from astra_jax import losses

R_BAND = 1  # Index of r in the g,r,i,z,y aperture fluxes.
_KEYS = ("flux", "weight", "aperture_flux", "z", "has_z", "specobj_id")


def load_split(dataset_dir: str, split: str) -> dict[str, np.ndarray]:
  """Every example of `split` except its images, as numpy arrays stacked along axis 0."""
  from astra_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = pipeline.load_builder(dataset_dir)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: {k: ex[k] for k in _KEYS}).batch(256)
  parts = list(tfds.as_numpy(ds))
  return {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}


def _normalised(data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(flux / norm, norm, valid) exactly as the training loss normalises."""
  flux_norm, norm = losses.normalise_spectrum(data["flux"], data["weight"])
  return np.asarray(flux_norm), np.asarray(norm), data["weight"] > 0


def _valid_mean(spectra: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
  """Mean over `axis` of the valid pixels only; 0 where no spectrum is valid."""
  count = valid.sum(axis)
  return np.where(valid, spectra, 0).sum(axis) / np.maximum(count, 1)


def _flux_ratio(norm: np.ndarray, aperture_r: np.ndarray) -> np.ndarray:
  """norm / aperture r flux (1e-17 erg/s/cm^2/A per nanomaggy); NaN without a usable aperture."""
  ok = np.isfinite(aperture_r) & (aperture_r > 0)
  return np.where(ok, norm / np.where(ok, aperture_r, 1.0), np.nan)


def _prediction(data, spectrum, log_norm, z) -> dict[str, np.ndarray]:
  """A predictor's output in the layout `evaluate.scalar_metrics` scores."""
  return {"flux": data["flux"], "weight": data["weight"], "z": data["z"], "has_z": data["has_z"],
          "spectrum": spectrum, "log_norm": log_norm, "z_mean": z, "z_mode": z,
          "pred_flux": spectrum * 10.0 ** log_norm[:, None]}


class MeanSpectrum:
  """Baseline (a): one mean spectrum, scaled by the r-band aperture flux."""

  def fit(self, train: dict[str, np.ndarray]) -> "MeanSpectrum":
    flux_norm, norm, valid = _normalised(train)
    self.spectrum = _valid_mean(flux_norm, valid, axis=0)
    ratio = _flux_ratio(norm, train["aperture_flux"][:, R_BAND])
    self.ratio = float(np.nanmedian(ratio))
    self.norm = float(np.median(norm))
    self.z = float(np.median(train["z"][train["has_z"].astype(bool)]))
    return self

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(data["z"])
    aperture_r = data["aperture_flux"][:, R_BAND]
    norm = np.where(aperture_r > 0, self.ratio * aperture_r, self.norm)
    return _prediction(data, np.tile(self.spectrum, (n, 1)), np.log10(norm),
                       np.full(n, self.z, np.float32))


def colour_features(aperture_flux: np.ndarray) -> np.ndarray:
  """(N, 5) grizy nanomaggies -> (N, 5): g-r, r-i, i-z, z-y and r, in asinh magnitudes.

  Asinh magnitudes (Lupton et al. 1999, softening 0.01 nanomaggies ~ 27.5 mag) stay finite for the
  faint or negative aperture fluxes that noise produces.
  """
  b = 0.01
  mag = -2.5 / np.log(10) * (np.arcsinh(np.nan_to_num(aperture_flux) / (2 * b)) + np.log(b))
  mag = 22.5 + mag
  return np.concatenate([mag[:, :-1] - mag[:, 1:], mag[:, R_BAND:R_BAND + 1]], axis=1)


class ColourKNN:
  """Baseline (b): k nearest neighbours in standardised aperture colours and r magnitude."""

  def __init__(self, k: int = 10):
    self.k = k

  def fit(self, train: dict[str, np.ndarray]) -> "ColourKNN":
    features = colour_features(train["aperture_flux"])
    self.mean, self.std = features.mean(0), features.std(0) + 1e-6
    self.features = (features - self.mean) / self.std
    self.flux_norm, norm, self.valid = _normalised(train)
    self.ratio = _flux_ratio(norm, train["aperture_flux"][:, R_BAND])
    self.norm = norm
    self.z = np.where(train["has_z"].astype(bool), train["z"], np.nan)
    return self

  def neighbours(self, data: dict[str, np.ndarray]) -> np.ndarray:
    """(N, k) indices of the training neighbours of each galaxy, nearest first."""
    features = (colour_features(data["aperture_flux"]) - self.mean) / self.std
    d2 = ((features[:, None, :] - self.features[None, :, :]) ** 2).sum(-1)
    k = min(self.k, len(self.features))
    idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(d2, idx, axis=1).argsort(axis=1)
    return np.take_along_axis(idx, order, axis=1)

  def predict(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    idx = self.neighbours(data)
    spectrum = _valid_mean(self.flux_norm[idx], self.valid[idx], axis=1)
    ratio = np.nanmedian(self.ratio[idx], axis=1)
    aperture_r = data["aperture_flux"][:, R_BAND]
    usable = (aperture_r > 0) & np.isfinite(ratio)
    norm = np.where(usable, ratio * np.where(usable, aperture_r, 1.0),
                    np.median(self.norm[idx], axis=1))
    z = np.nanmedian(self.z[idx], axis=1).astype(np.float32)
    return _prediction(data, spectrum, np.log10(norm), z)
