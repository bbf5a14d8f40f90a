"""Multi-aperture photometry on synthetic cutouts, and the features built from it."""

import math

import numpy as np
import pytest

from astra_jax import photometry
from astra_jax.data import preprocess

SIZE = 160  # Pixels: 40 arcsec at 0.25 arcsec per pixel, room for the 20 arcsec aperture.


def _gaussian_blob(total_counts, sigma_arcsec=1.0, size=SIZE, pixel_scale=0.25):
  """(size, size) counts of a centred circular Gaussian holding `total_counts` in all."""
  yy, xx = np.mgrid[:size, :size]
  r2 = (yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2
  s = sigma_arcsec / pixel_scale
  return total_counts * np.exp(-0.5 * r2 / s**2) / (2 * np.pi * s**2)


def test_large_aperture_holds_the_total_flux_in_nanomaggies():
  zp = 27.5
  counts = np.array([1e4, 2e4, 3e4, 4e4, 5e4])
  images = np.stack([_gaussian_blob(c) for c in counts])
  headers = [{"MAGZERO": zp}] * 5
  fluxes = photometry.aperture_fluxes(images, headers)
  assert fluxes.shape == (5, 5) and fluxes.dtype == np.float32
  # AB mag = zp - 2.5 log10(counts) = 22.5 - 2.5 log10(f)  =>  f = counts 10^(-0.4 (zp - 22.5)).
  expected_total = counts * 10 ** (-0.4 * (zp - 22.5))
  np.testing.assert_allclose(fluxes[:, -1], expected_total, rtol=1e-4)   # 20": 10 sigma.
  # Smaller apertures: the Gaussian's enclosed fraction 1 - exp(-r^2 / 2 sigma^2), to the
  # pixelisation of whole pixels (1.5": a 3-pixel radius, 11 % over; 3" and up within 1 %).
  radius = np.array(photometry.DIAMETERS_ARCSEC) / 2
  enclosed = 1 - np.exp(-0.5 * radius**2)
  fraction = fluxes / expected_total[:, None]
  np.testing.assert_allclose(fraction[:, 0], enclosed[0], rtol=0.15)
  np.testing.assert_allclose(fraction[:, 1:], np.tile(enclosed[1:], (5, 1)), rtol=0.01)
  assert np.all(np.diff(fluxes, axis=1) > 0)


def test_scaled_counts_with_a_shifted_zero_point_give_the_same_nanomaggies():
  rng = np.random.default_rng(0)
  images = np.stack([_gaussian_blob(1e4, s) for s in (0.8, 1.0, 1.2, 1.5, 2.0)])
  images += rng.normal(0, 0.5, images.shape)
  k = 7.3
  base = photometry.aperture_fluxes(images, [{"MAGZERO": 25.0}] * 5)
  scaled = photometry.aperture_fluxes(images * k, [{"MAGZERO": 25.0 + 2.5 * math.log10(k)}] * 5)
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  # EXPTIME alone: zero point 25 + 2.5 log10(EXPTIME), as for the PS1 stacks.
  by_exptime = photometry.aperture_fluxes(images * k, [{"EXPTIME": k}] * 5)
  np.testing.assert_allclose(by_exptime, base, rtol=1e-5)


def test_the_3_arcsec_column_is_the_stored_aperture_flux():
  rng = np.random.default_rng(1)
  images = rng.normal(0, 1, (5, SIZE, SIZE)).astype(np.float32) + _gaussian_blob(3e3)
  images[2, 80, 80] = np.nan                                 # Counts as 0 in both.
  headers = [{"MAGZERO": 25.0 + b} for b in range(5)]
  fluxes = photometry.aperture_fluxes(images, headers)
  column = photometry.DIAMETERS_ARCSEC.index(preprocess.APERTURE_DIAMETER_ARCSEC)
  np.testing.assert_array_equal(fluxes[:, column], preprocess.aperture_flux(images, headers))
  assert np.isnan(photometry.aperture_fluxes(images, [{}] * 5)).all()   # No zero point.


def _fluxes_of_magnitudes(mags):
  """(N, 5, 5) nanomaggies with AB magnitudes `mags` (N, 5, 5)."""
  return 10 ** (-0.4 * (np.asarray(mags, np.float64) - 22.5))


def test_features_of_hand_made_fluxes():
  # Galaxy 0: bands 18, 17.5, 17.2, 17.0, 16.9 mag in every aperture but brighter outwards
  # by 0, 0.1, 0.3, 0.5, 0.6 mag in each band (colours the same in every aperture).
  band_mag = np.array([18.0, 17.5, 17.2, 17.0, 16.9])
  growth = np.array([0.0, -0.1, -0.3, -0.5, -0.6])
  mags = band_mag[:, None] + growth[None, :]
  x = photometry.features(_fluxes_of_magnitudes(mags[None]))
  assert x.shape == (1, len(photometry.feature_names())) == (1, 23) and x.dtype == np.float32
  named = dict(zip(photometry.feature_names(), x[0]))
  for d in ("1.5", "3", "6", "10"):
    np.testing.assert_allclose([named[f"g-r@{d}"], named[f"r-i@{d}"], named[f"i-z@{d}"],
                                named[f"z-y@{d}"]], [0.5, 0.3, 0.2, 0.1], atol=1e-5)
  np.testing.assert_allclose([named["r@10"], named["r@20"]], [17.0, 16.9], atol=1e-5)
  np.testing.assert_allclose(named["r@3-r@10"], 0.4, atol=1e-5)
  np.testing.assert_allclose([named["r@1.5-r@3"], named["r@3-r@6"], named["r@6-r@10"],
                              named["r@10-r@20"]], [0.1, 0.2, 0.2, 0.1], atol=1e-5)


def test_non_positive_fluxes_are_floored_and_bad_shapes_refused():
  fluxes = np.full((1, 5, 5), 100.0)
  fluxes[0, 0, 0] = -3.0                                     # g at 1.5": noise below zero.
  named = dict(zip(photometry.feature_names(), photometry.features(fluxes)[0]))
  floor_mag = 22.5 - 2.5 * math.log10(photometry.FLUX_FLOOR_NMGY)
  assert named["g-r@1.5"] == pytest.approx(floor_mag - 17.5)
  assert np.isfinite(photometry.features(fluxes)).all()
  with pytest.raises(ValueError, match="grizy"):
    photometry.features(np.ones((2, 5, 4)))
