"""One raw galaxy -> the feature dict of an `astropixel` example, or a rejection; no TensorFlow.

Preparation's reader processes import only this module (numpy, astropy), not tensorflow_datasets:
they receive an `ExampleConfig`, a plain dataclass, rather than the tfds builder config.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import multiprocessing.pool
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from astra_jax import grid
from astra_jax import photometry
from astra_jax.data import fits_io
from astra_jax.data import preprocess

RAW_IMAGE_SIZE = 288
#: Default asinh softening, in units of the PS1 median sky noise per pixel
#: (`preprocess.ps1_sky_sigma_nmgy`): linear up to ~2.5 sigma of a median stack's sky.
SOFTENING_SIGMAS = 2.5


@dataclasses.dataclass
class ExampleConfig:
  """The parameters of `galaxy_example`; `astropixel.AstropixelConfig` extends it.

  Attributes:
    bands: band letters in the fixed order of the `image` axis 0.
    image_size: stored image size in pixels; the 288x288 cutouts are mean-binned to it.
    softening_nmgy: asinh softening per band (order of `bands`), nanomaggies per pixel: a
      survey constant (`preprocess.stretch`), by default SOFTENING_SIGMAS x the PS1 median sky
      noise per pixel.
    min_valid_pixels: galaxies with fewer grid pixels of weight > 0 are rejected.
    max_nonfinite_fraction: images with a larger non-finite fraction are rejected.
  """
  bands: tuple[str, ...] = grid.PS1_BANDS
  image_size: int = RAW_IMAGE_SIZE
  softening_nmgy: tuple[float, ...] = preprocess.ps1_softening_nmgy(grid.PS1_BANDS,
                                                                    SOFTENING_SIGMAS)
  min_valid_pixels: int = 500
  max_nonfinite_fraction: float = 0.5

  @classmethod
  def of(cls, config) -> ExampleConfig:
    """The `ExampleConfig` of any object with these attributes (e.g. an `AstropixelConfig`)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def image_example(images: np.ndarray, headers, config, paths) -> np.ndarray:
  """Cutouts in counts (bands, 288, 288) -> calibrated, stretched, binned float16 (bands, S, S).

  The one image path shared by preparation (plain and Beam) and prediction; `config` an
  `ExampleConfig` or an `AstropixelConfig`. Each band is calibrated to nanomaggies by its
  header's zero point and stretched as asinh(f / softening_nmgy[b]) (`preprocess.stretch`), then
  mean-binned to config.image_size. `headers` and `paths` (the files, named in a rejection) are
  per band. Raises `fits_io.InputError` (NO_ZERO_POINT, MOSTLY_NONFINITE) naming the band's file.

  float16 halves what training reads per example, and holds these values safely: the brightest
  plausible pixel, ~1e7 nanomaggies (a 5th-magnitude star's core), is asinh(1e7 / 0.03) ~ 20,
  far below float16's 65504 (the mock survey's brightest galaxy pixels reach ~7). Its rounding
  is relative, <= 2^-11 of the value (absolute <= 2^-12 below 1, where the sky is): against the
  sky noise, which the stretch maps to ~1 / SOFTENING_SIGMAS = 0.4, it adds < 1e-6 of the noise
  variance. In flux, where asinh is logarithmic, it is a relative error <= 2^-11 x value:
  <= 0.2 % at value 4 (~1 nanomaggy a pixel in r), ~10x below the pixel's noise there, and
  0.35 % at 7, comparable to the Poisson noise of the brightest cores. Over an aperture these
  independent errors average out: 3 arcsec fluxes recovered from the stored values
  (f = softening x sinh(value), 288 px) are within 0.03 %, <= 0.3 sigma of their photometric
  noise, on 80 mock galaxies (tests/test_prepare.py checks the colours).
  """
  try:
    stretched = preprocess.stretch(images, preprocess.zero_points(headers),
                                   config.softening_nmgy,
                                   max_bad_fraction=config.max_nonfinite_fraction)
  except preprocess.PreprocessError as e:
    raise fits_io.InputError(paths[e.band], e.reason,
                             detail=f"band {config.bands[e.band]}") from None
  factor = images.shape[-1] // config.image_size
  if factor > 1:
    stretched = preprocess.bin_image(stretched, factor)
  return stretched.astype(np.float16)


def galaxy_example(galaxy_dir: str, row: fits_io.CatalogRow, config) -> dict:
  """One raw galaxy folder -> the feature dict. Raises `fits_io.InputError` with the reason."""
  galaxy = fits_io.read_galaxy(galaxy_dir, bands=config.bands, row=row,
                               image_shape=(RAW_IMAGE_SIZE, RAW_IMAGE_SIZE))
  spectrum = galaxy.spectrum
  if spectrum is None:
    raise fits_io.InputError(galaxy_dir, "missing spectrum")
  flux, weight = preprocess.resample_to_grid(spectrum.wavelength, spectrum.flux,
                                             ivar=spectrum.ivar, and_mask=spectrum.and_mask)
  valid = preprocess.count_valid(weight)
  if valid < config.min_valid_pixels:
    raise fits_io.InputError(spectrum.path,
                             f"fewer than {config.min_valid_pixels} valid pixels on the grid",
                             detail=f"{valid} valid")
  z = row.z if row.has_z else spectrum.z
  has_z = bool(np.isfinite(z))
  paths = [fits_io.band_path(galaxy_dir, row.specobj_id, b) for b in config.bands]
  image = image_example(galaxy.images, galaxy.headers, config, paths)
  fluxes = photometry.aperture_fluxes(galaxy.images, galaxy.headers)
  return {
      "image": image,
      # The 3 arcsec column is preprocess.aperture_flux (the colour baseline's), exactly.
      "aperture_flux": fluxes[:, photometry.DIAMETERS_ARCSEC.index(
          preprocess.APERTURE_DIAMETER_ARCSEC)],
      "aperture_fluxes": fluxes,
      "flux": flux.astype(np.float32),
      "weight": weight.astype(np.float32),
      "z": np.float32(z if has_z else 0.0),
      "has_z": has_z,
      "specobj_id": row.specobj_id,
      "fiber_diameter": np.float32(row.fiber_diameter),
      "ra": np.float64(row.ra),
      "dec": np.float64(row.dec),
  }


def reader_pool(num_workers: int) -> multiprocessing.pool.Pool:
  """`num_workers` reader processes for `try_example`, spawned rather than forked: the parent
  holds TensorFlow's (and XLA's) threads, which a forked copy would inherit mid-flight. They
  import only this module's dependencies (numpy, astropy), not TensorFlow."""
  return multiprocessing.get_context("spawn").Pool(num_workers)


def imap_bounded(pool: multiprocessing.pool.Pool, fn: Callable, jobs: Iterable,
                 ahead: int) -> Iterator[Any]:
  """`fn(job)` for each of `jobs`, computed by `pool`'s workers, yielded in the jobs' order.

  At most `ahead` jobs are handed to the pool and their results not yet yielded: `pool.imap`
  hands out every job at once, and the results that a slower consumer has not taken yet
  (~0.9 MB per 288-px galaxy) would pile up in memory.
  """
  pending = collections.deque()
  for job in jobs:
    if len(pending) >= ahead:
      yield pending.popleft().get()
    pending.append(pool.apply_async(fn, (job,)))
  while pending:
    yield pending.popleft().get()


def rejection(specobj_id: str | None, path: str, reason: str, detail: str | None = None) -> dict:
  """One line of rejected.jsonl: a stable `reason`, and the particulars in `detail`."""
  out = {"specobj_id": specobj_id, "path": path, "reason": reason}
  if detail:
    out["detail"] = detail
  return out


def try_example(args) -> tuple[str, dict | None, dict | None]:
  """(galaxy_dir, row, config) -> (key, example, None) or (key, None, rejection); never raises."""
  galaxy_dir, row, config = args
  try:
    return row.specobj_id, galaxy_example(galaxy_dir, row, config), None
  except fits_io.InputError as e:
    return row.specobj_id, None, rejection(row.specobj_id, e.path, e.reason, e.detail)
  except Exception as e:  # pylint: disable=broad-except
    # One unexpected failure must not kill a run over thousands of galaxies; it is still reported.
    return row.specobj_id, None, rejection(row.specobj_id, galaxy_dir, "unexpected error", repr(e))
