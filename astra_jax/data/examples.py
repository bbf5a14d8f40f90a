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
from astra_jax.data import fits_io
from astra_jax.data import preprocess

RAW_IMAGE_SIZE = 288


@dataclasses.dataclass
class ExampleConfig:
  """The parameters of `galaxy_example`; `astropixel.AstropixelConfig` extends it.

  Attributes:
    bands: band letters in the fixed order of the `image` axis 0.
    image_size: stored image size in pixels; the 288x288 cutouts are mean-binned to it.
    stretch_beta: asinh softening in units of each band's sky sigma.
    min_valid_pixels: galaxies with fewer grid pixels of weight > 0 are rejected.
    max_nonfinite_fraction: images with a larger non-finite fraction are rejected.
  """
  bands: tuple[str, ...] = grid.PS1_BANDS
  image_size: int = RAW_IMAGE_SIZE
  stretch_beta: float = 2.5
  min_valid_pixels: int = 500
  max_nonfinite_fraction: float = 0.5

  @classmethod
  def of(cls, config) -> ExampleConfig:
    """The `ExampleConfig` of any object with these attributes (e.g. an `AstropixelConfig`)."""
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def image_example(images: np.ndarray, config, path: str) -> np.ndarray:
  """Linear-flux cutouts (bands, 288, 288) -> stretched, binned float16 (bands, S, S).

  The one image path shared by preparation and prediction; `config` an `ExampleConfig` or an
  `AstropixelConfig`. Raises `fits_io.InputError`.

  float16 halves what training reads per example. Its rounding (relative 2^-11; absolute
  <= 2^-12 below 1, where the sky is) is far below the pixel noise, which asinh(x / (beta sigma))
  maps to ~1 / beta = 0.4 near the sky: it adds < 1e-5 of the noise variance. Stretched values
  stay below ~25 (asinh of 1e10), far from float16's 65504.
  """
  try:
    stretched, _ = preprocess.stretch(images, config.stretch_beta,
                                      max_bad_fraction=config.max_nonfinite_fraction)
  except preprocess.PreprocessError as e:
    raise fits_io.InputError(path, e.reason) from None
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
  return {
      "image": image_example(galaxy.images, config, galaxy_dir),
      "aperture_flux": preprocess.aperture_flux(galaxy.images, galaxy.headers),
      "flux": flux.astype(np.float32),
      "weight": weight.astype(np.float32),
      "z": np.float32(z if has_z else 0.0),
      "has_z": has_z,
      "specobj_id": row.specobj_id,
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
