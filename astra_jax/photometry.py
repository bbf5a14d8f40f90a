"""Calibrated multi-aperture photometry measured on the cutouts, and the features built from it.

`aperture_fluxes` measures every band in centred circular apertures of `DIAMETERS_ARCSEC`, in
nanomaggies (AB mag = 22.5 - 2.5 log10 f), through `preprocess.aperture_flux`: the 3 arcsec
column is exactly the `aperture_flux` every example stores. A dataset stores the result per
galaxy as `aperture_fluxes`, (bands, len(DIAMETERS_ARCSEC)) = (5, 5) float32, bands g,r,i,z,y.

`features` turns those fluxes into the photometric baselines' inputs (see its docstring).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from astra_jax import grid
from astra_jax.data import preprocess

#: Aperture diameters in arcsec: inside the PSF, the SDSS fiber, and three outer radii that
#: trace the curve of growth (20 arcsec ~ the total light of all but the nearest galaxies).
DIAMETERS_ARCSEC = (1.5, 3.0, 6.0, 10.0, 20.0)
#: Diameters whose adjacent-band colours are features (20 arcsec colours are mostly sky noise).
COLOUR_DIAMETERS_ARCSEC = (1.5, 3.0, 6.0, 10.0)
#: Fluxes below this (nanomaggies; 25 AB mag, below the PS1 stack depth in these apertures) are
#: raised to it before taking magnitudes, so non-positive or noise-level fluxes give a finite
#: magnitude of at most 25.
FLUX_FLOOR_NMGY = 0.1
#: The dataset key of `aperture_fluxes`, (bands, len(DIAMETERS_ARCSEC)) float32 per example.
KEY = "aperture_fluxes"
R_BAND = 1  # Index of r in g,r,i,z,y.


def aperture_fluxes(images: np.ndarray, headers,
                    diameters_arcsec: Sequence[float] = DIAMETERS_ARCSEC,
                    pixel_scale: float = preprocess.PS1_PIXEL_SCALE_ARCSEC) -> np.ndarray:
  """Fluxes in centred circular apertures, (bands, len(diameters_arcsec)) float32 nanomaggies.

  images: (bands, H, W) linear, sky-subtracted counts; headers: per band, with MAGZERO or
  EXPTIME (`preprocess.zero_point`); pixel_scale in arcsec per pixel. Each column is
  `preprocess.aperture_flux` at that diameter (pixels whose centre is inside count whole;
  non-finite pixels count as 0; NaN for a band without a zero point).
  """
  return np.stack([preprocess.aperture_flux(images, headers, d, pixel_scale)
                   for d in diameters_arcsec], axis=-1)


@functools.lru_cache(maxsize=None)
def band_nmgy_weights(band: str = "r") -> np.ndarray:
  """(grid.NUM_PIXELS,) float64 w such that w @ flux is the AB flux in nanomaggies, through
  speclite's `panstarrs-{band}` curve, of a spectrum on the grid in 1e-17 erg/s/cm^2/Angstrom.

  AB maggies = integral(f_lambda R lambda dlambda) / integral(3631 Jy c / lambda^2 R lambda dlambda)
  (photon-counting response R), both integrals summed over the grid's pixels. Bands that leave
  the grid (PS1 y) are cut at its edge: valid for g, r, i, z.
  """
  import speclite.filters  # pylint: disable=g-import-not-at-top
  curve = speclite.filters.load_filter(f"panstarrs-{band}")
  wave, dwave = grid.wavelength(), np.diff(grid.pixel_edges())
  response = np.interp(wave, curve.wavelength, curve.response, left=0.0, right=0.0)
  ab_flam = 3631e-23 * 2.99792458e18 / wave**2 / 1e-17    # 1 maggie as f_lambda, 1e-17 units.
  maggies = response * wave * dwave / np.sum(ab_flam * response * wave * dwave)
  return maggies * 1e9


def magnitudes(flux: np.ndarray, xp=np) -> np.ndarray:
  """AB magnitudes 22.5 - 2.5 log10(max(f, FLUX_FLOOR_NMGY)) of nanomaggies; NaN stays NaN.
  `xp`: the array module (numpy, or jax.numpy inside a model)."""
  return 22.5 - 2.5 * xp.log10(xp.maximum(flux, FLUX_FLOOR_NMGY))


def feature_names(bands: str = "grizy") -> list[str]:
  """Names of the `features` columns, in order."""
  names = [f"{a}-{b}@{d:g}" for d in COLOUR_DIAMETERS_ARCSEC for a, b in zip(bands, bands[1:])]
  names += ["r@10", "r@20", "r@3-r@10"]
  names += [f"r@{a:g}-r@{b:g}" for a, b in zip(DIAMETERS_ARCSEC, DIAMETERS_ARCSEC[1:])]
  return names


def features(fluxes: np.ndarray, xp=np) -> np.ndarray:
  """(N, 5, 5) `aperture_fluxes` (grizy x DIAMETERS_ARCSEC, nanomaggies) -> (N, 23) float32.

  The photometric baselines' inputs and ASTRA's photometry embedding's (`xp`: numpy, computed in
  float64; jax.numpy, in float32 inside the model, where NaN fluxes count as 0, i.e. floored).

  Columns (all AB magnitudes or magnitude differences, see `feature_names`; fluxes below
  FLUX_FLOOR_NMGY are floored first, see `magnitudes`):
    0-15: colours g-r, r-i, i-z, z-y in each of the 1.5, 3, 6 and 10 arcsec apertures (mag);
    16, 17: r magnitude in the 10 and 20 arcsec apertures (mag);
    18: concentration, r mag(3 arcsec) - r mag(10 arcsec) (mag; 0 for a point source, larger
      for extended light);
    19-22: the r-band curve of growth, mag(d_i) - mag(d_i+1) for adjacent diameters
      (= 2.5 log10 of the flux ratio, a size measure; mag).
  """
  if xp is np:
    fluxes = np.asarray(fluxes, np.float64)
  else:
    fluxes = xp.nan_to_num(xp.asarray(fluxes, xp.float32))
  if fluxes.ndim != 3 or fluxes.shape[1:] != (5, len(DIAMETERS_ARCSEC)):
    raise ValueError(f"fluxes must be (N, 5, {len(DIAMETERS_ARCSEC)}) grizy x "
                     f"{DIAMETERS_ARCSEC} arcsec, got {fluxes.shape}")
  mag = magnitudes(fluxes, xp)                                # (N, bands, apertures)
  column = {d: i for i, d in enumerate(DIAMETERS_ARCSEC)}
  colours = [mag[:, :-1, column[d]] - mag[:, 1:, column[d]] for d in COLOUR_DIAMETERS_ARCSEC]
  r = mag[:, R_BAND]                                          # (N, apertures)
  parts = colours + [r[:, [column[10.0], column[20.0]]],
                     r[:, [column[3.0]]] - r[:, [column[10.0]]],
                     r[:, :-1] - r[:, 1:]]
  return xp.concatenate(parts, axis=1).astype(xp.float32)


#: Number of `features` columns (23).
NUM_FEATURES = len(feature_names())


def feature_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) (F,) of features x (N, F) over galaxies, in x's dtype, NaN ignored, std + 1e-6
  (mag): the standardisation of the photometric baselines and of ASTRA's photometry embedding,
  measured on a training split."""
  return np.nanmean(x, axis=0), np.nanstd(x, axis=0) + 1e-6
