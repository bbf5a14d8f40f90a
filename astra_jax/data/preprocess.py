"""Pure-numpy preprocessing: calibration and stretch of images, binning, spectrum resampling,
split assignment.

Units: cutouts in linear counts (already sky-subtracted by the PS1 stack pipeline, so 0 is the
sky level), calibrated by each band's header zero point to nanomaggies (AB mag = 22.5 - 2.5
log10 f); wavelengths in Angstrom (vacuum, observed frame); flux densities in
1e-17 erg/s/cm^2/Angstrom, inverse variances in their inverse square.
"""

import functools
import hashlib
import math
from typing import Optional, Sequence

import numpy as np

from astra_jax import grid

# Stable rejection reasons (PreprocessError.reason).
MOSTLY_NONFINITE = "mostly non-finite image"
NO_ZERO_POINT = "no usable zero point (MAGZERO or EXPTIME)"

#: Input spectra whose log10(wavelength) sits within this of the grid lattice are copied.
LATTICE_TOL_DEX = 1e-6
#: Off-lattice resampling: a grid pixel is "measured" when good source pixels cover at least
#: this fraction of its width (no extrapolation beyond the measured range).
MIN_COVERAGE = 0.5
SPLITS = ("train", "validation", "test")


class PreprocessError(ValueError):
  """An image the builder must reject. `reason` is one of the constants above; `band` the index."""

  def __init__(self, reason: str, band: Optional[int] = None):
    self.reason = reason
    self.band = band
    super().__init__(reason if band is None else f"{reason} (band {band})")

  def __reduce__(self):  # Keeps the attributes through pickling (multiprocessing workers).
    return (PreprocessError, (self.reason, self.band))


# --------------------------------------------------------------------------- images

#: Pan-STARRS1 stack cutouts: 0.25 arcsec per pixel.
PS1_PIXEL_SCALE_ARCSEC = 0.25
#: The PS1 3pi stacks' median 5 sigma point-source depth (AB mag) and median seeing (FWHM,
#: arcsec) per band: Chambers et al. 2016, arXiv:1612.05560.
PS1_DEPTH5_AB = {"g": 23.3, "r": 23.2, "i": 23.1, "z": 22.3, "y": 21.4}
PS1_SEEING_FWHM_ARCSEC = {"g": 1.31, "r": 1.19, "i": 1.11, "z": 1.07, "y": 1.02}
#: FWHM / sigma of a Gaussian, 2 sqrt(2 ln 2).
_FWHM_PER_SIGMA = 2.355


def ps1_sky_sigma_nmgy(band: str) -> float:
  """The PS1 3pi stacks' median sky noise per 0.25" pixel in `band`, nanomaggies: a survey
  constant, from the published depth and seeing (PS1_DEPTH5_AB, PS1_SEEING_FWHM_ARCSEC).

  A point source of flux f measured with its PSF (optimal weights) over white sky noise
  sigma_pix per pixel has noise sigma_pix sqrt(NEA), NEA = 1 / sum(PSF^2) the noise-equivalent
  area; a Gaussian PSF of FWHM w has NEA = 4 pi (w / 2.355 / 0.25")^2 pixels. The 5 sigma depth
  m5 is the flux f5 = 10^(-0.4 (m5 - 22.5)) nanomaggies = 5 sigma_pix sqrt(NEA), so

    sigma_pix = f5 / (5 sqrt(NEA)):
      band  m5    w ["]  f5 [nmgy]  NEA [px]  sigma_pix [nmgy]
      g     23.3  1.31   0.4786     62.2      0.01214
      r     23.2  1.19   0.5248     51.3      0.01465
      i     23.1  1.11   0.5754     44.7      0.01722
      z     22.3  1.07   1.2023     41.5      0.03732
      y     21.4  1.02   2.7542     37.7      0.08969

  Check against the mock survey (astra_jax.data.mock), whose stacks have 7-19 epochs per band
  and galaxy: the median of SKYSIG x 10^(-0.4 (MAGZERO - 22.5)) over 384 mock galaxies is
  0.01157, 0.01458, 0.01641, 0.03557, 0.08549 (g to y), 0.5-5 % below these; its PSF has
  wings (NEA 10 % above the Gaussian's at the same FWHM), hence a 4.7 % smaller sigma_pix for
  the same depth.
  Raises KeyError for a band that is not a PS1 band.
  """
  f5 = 10.0 ** (-0.4 * (PS1_DEPTH5_AB[band] - 22.5))
  nea = 4.0 * math.pi * (PS1_SEEING_FWHM_ARCSEC[band] / _FWHM_PER_SIGMA
                         / PS1_PIXEL_SCALE_ARCSEC) ** 2
  return f5 / (5.0 * math.sqrt(nea))


def ps1_softening_nmgy(bands: Sequence[str], sky_sigmas: float) -> tuple[float, ...]:
  """The asinh softening of `stretch` per band, in nanomaggies: `sky_sigmas` times the PS1
  median sky noise per pixel (`ps1_sky_sigma_nmgy`), bands in the given order."""
  unknown = [b for b in bands if b not in PS1_DEPTH5_AB]
  if unknown:
    raise ValueError(f"no PS1 sky noise for bands {unknown}; PS1 bands are {tuple(PS1_DEPTH5_AB)}")
  if not sky_sigmas > 0:
    raise ValueError(f"the softening must be > 0 sky sigmas, got {sky_sigmas}")
  return tuple(float(sky_sigmas) * ps1_sky_sigma_nmgy(b) for b in bands)


def _header_number(header, key: str) -> float:
  """header[key] as a float; NaN when missing or not a number."""
  try:
    return float(header[key])
  except (KeyError, TypeError, ValueError):
    return math.nan


def zero_point(header) -> float:
  """AB zero point of a cutout (AB mag = zp - 2.5 log10 counts): a finite MAGZERO, else
  25 + 2.5 log10(EXPTIME) for a finite EXPTIME > 0 (PS1 stacks); NaN if neither.

  header: a fits.Header or any mapping of those keys.
  """
  magzero = _header_number(header, "MAGZERO")
  if math.isfinite(magzero):
    return magzero
  exptime = _header_number(header, "EXPTIME")
  if math.isfinite(exptime) and exptime > 0:
    return float(25.0 + 2.5 * np.log10(exptime))
  return math.nan


def zero_points(headers) -> np.ndarray:
  """(bands,) float64 `zero_point` of each band's header."""
  return np.array([zero_point(h) for h in headers], np.float64)


def nmgy_per_count(zp) -> np.ndarray:
  """Nanomaggies per count at AB zero point(s) `zp`: 10^(-0.4 (zp - 22.5)), float64."""
  return 10.0 ** (-0.4 * (np.asarray(zp, np.float64) - 22.5))


def asinh(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
  """arcsinh of a finite float32 array, float32, as sign(x) log(|x| + sqrt(x^2 + 1)).

  np.arcsinh is scalar libm here (~2.3 ms per 288 x 288 band); this runs on numpy's vectorised
  float32 log (~0.8 ms). Absolute error <= 2e-7 near 0 and relative error <= 3e-7 (1 ulp)
  elsewhere, far below the noise of a stretched image. `out` (float32, x's shape; may be x
  itself) receives the result.
  """
  x = np.asarray(x, np.float32)
  a = np.abs(x)
  with np.errstate(over="ignore"):
    y = a * a  # Overflows to inf beyond 1.8e19; those are redone below.
  y += np.float32(1.0)
  np.sqrt(y, out=y)
  y += a
  np.log(y, out=y)
  if a.size and a.max() > np.float32(1e18):  # asinh(a) = log(2a) to float32 precision there.
    huge = a > np.float32(1e18)
    y[huge] = np.log(a[huge]) + np.float32(math.log(2.0))
  return np.copysign(y, x, out=y if out is None else out)


def stretch(images: np.ndarray, zps: Sequence[float], softening_nmgy: Sequence[float],
            max_bad_fraction: float = 0.5) -> np.ndarray:
  """Calibrated asinh stretch, band by band: asinh(f / softening_nmgy[b]), with
  f = counts * 10^(-0.4 (zps[b] - 22.5)) the pixel's flux in nanomaggies.

  The softening is a fixed survey constant per band (e.g. `ps1_softening_nmgy`), never the
  cutout's own noise, so a pixel's value depends on its calibrated flux alone: a galaxy and a
  copy in other units (counts x k, zero point + 2.5 log10 k) give the same values, and one
  observed with less exposure the same values within its larger noise. |f| << softening is
  linear, |f| >> softening logarithmic; f = softening_nmgy[b] * sinh(value) inverts it.

  Args:
    images: (bands, H, W) linear, sky-subtracted counts.
    zps: (bands,) AB zero points (`zero_point`).
    softening_nmgy: (bands,) asinh softening, nanomaggies per pixel, > 0.
    max_bad_fraction: more non-finite pixels than this fraction of a band is an error.
  Returns:
    (bands, H, W) float32, non-finite pixels at 0 (= sky).
  Raises:
    PreprocessError(NO_ZERO_POINT | MOSTLY_NONFINITE, band): a non-finite zero point; too many
      non-finite pixels.
  """
  images = np.asarray(images)
  if images.ndim != 3:
    raise ValueError(f"images must be (bands, H, W), got shape {images.shape}")
  zps = np.asarray(zps, np.float64)
  softening = np.asarray(softening_nmgy, np.float64)
  nbands = images.shape[0]
  if zps.shape != (nbands,) or softening.shape != (nbands,):
    raise ValueError(f"{nbands} bands need {nbands} zero points and softenings, got "
                     f"{zps.shape} and {softening.shape}")
  if not np.all(softening > 0) or not np.all(np.isfinite(softening)):
    raise ValueError(f"softening_nmgy must be finite and > 0, got {softening_nmgy}")
  scale = nmgy_per_count(zps) / softening
  out = np.empty(images.shape, np.float32)
  for b in range(nbands):
    if not (np.isfinite(scale[b]) and scale[b] > 0):  # zp NaN or +-inf.
      raise PreprocessError(NO_ZERO_POINT, band=b)
    bad = ~np.isfinite(images[b])
    n_bad = int(np.count_nonzero(bad))
    if n_bad > max_bad_fraction * bad.size:
      raise PreprocessError(MOSTLY_NONFINITE, band=b)
    # Everything in place in out[b]: no copy of the band beyond this one.
    image = out[b]
    np.multiply(images[b], np.float32(scale[b]), out=image)
    if n_bad:
      image[bad] = 0.0  # The sky level: a masked pixel reads as blank sky.
    asinh(image, out=image)
  return out


def bin_image(images: np.ndarray, factor: int) -> np.ndarray:
  """Block-MEAN of (..., H, W) over factor x factor pixels: (..., H/factor, W/factor) float32.

  Mean, not sum: applied to stretched images it keeps values on the same asinh scale whatever
  the factor, so model inputs need no factor-dependent normalisation. (For linear flux a sum
  would conserve flux; mean = sum / factor**2. Note binning after the nonlinear stretch is not
  stretching the binned flux.) H and W must be multiples of factor.
  """
  images = np.asarray(images)
  h, w = images.shape[-2:]
  if factor < 1 or h % factor or w % factor:
    raise ValueError(f"bin factor {factor} must divide the image shape {(h, w)}")
  if factor == 1:
    return images.astype(np.float32)
  # Strided adds (float32 accumulation) are ~20x faster than .mean over the split axes.
  rows = images.reshape(images.shape[:-2] + (h // factor, factor, w))
  acc = rows[..., 0, :].astype(np.float32)
  for i in range(1, factor):
    acc += rows[..., i, :]
  cols = acc.reshape(acc.shape[:-1] + (w // factor, factor))
  out = cols[..., 0].copy()
  for i in range(1, factor):
    out += cols[..., i]
  out *= np.float32(1.0 / factor**2)
  return out


# --------------------------------------------------------------------------- spectra


def _source_weights(flux, ivar, and_mask):
  """(flux with bad pixels 0, float64 (n,); good (n,) bool; ivar or ones, float64 (n,))."""
  good = np.isfinite(flux)
  if ivar is not None:
    good &= np.isfinite(ivar) & (ivar > 0)
  if and_mask is not None:
    good &= np.asarray(and_mask) == 0
  w = np.ones_like(flux) if ivar is None else ivar
  return np.where(good, flux, 0.0), good, np.where(good, w, 0.0)


def _on_lattice_index(loglam: np.ndarray) -> Optional[np.ndarray]:
  """Grid index of every source pixel if all sit on the grid lattice (within LATTICE_TOL_DEX,
  strictly increasing index), else None."""
  if loglam.size == 0:
    return None
  pix = (loglam - grid.LOGLAM0) / grid.DLOGLAM
  idx = np.rint(pix)
  if np.max(np.abs(pix - idx)) * grid.DLOGLAM > LATTICE_TOL_DEX:
    return None
  if np.any(np.diff(idx) <= 0):
    return None
  return idx.astype(np.int64)


def _copy_on_lattice(idx, flux, good, w):
  out_flux = np.zeros(grid.NUM_PIXELS, np.float32)
  out_w = np.zeros(grid.NUM_PIXELS, np.float32)
  sel = good & (idx >= 0) & (idx < grid.NUM_PIXELS)
  out_flux[idx[sel]] = flux[sel]
  out_w[idx[sel]] = w[sel]
  return out_flux, out_w


def _bin_average(loglam, flux, good, w, has_ivar):
  """Flux-conserving resampling (see resample_to_grid), float32 (4000,) each."""
  out_flux = np.zeros(grid.NUM_PIXELS, np.float32)
  out_w = np.zeros(grid.NUM_PIXELS, np.float32)
  if loglam.size < 2:
    return out_flux, out_w
  # Source pixel edges: midpoints in log10(lambda) (the grid's convention), ends half a step out.
  mid = 0.5 * (loglam[1:] + loglam[:-1])
  src_edges = 10.0 ** np.concatenate(
      [[2 * loglam[0] - mid[0]], mid, [2 * loglam[-1] - mid[-1]]])
  grid_edges = grid.pixel_edges()
  lo, hi = max(src_edges[0], grid_edges[0]), min(src_edges[-1], grid_edges[-1])
  if hi <= lo:
    return out_flux, out_w
  # Every (source i, grid j) overlap is exactly one segment between consecutive breakpoints.
  inner = np.union1d(src_edges[(src_edges > lo) & (src_edges < hi)],
                     grid_edges[(grid_edges > lo) & (grid_edges < hi)])
  points = np.concatenate([[lo], inner, [hi]])
  seg = np.diff(points)
  centre = 0.5 * (points[1:] + points[:-1])
  i = np.searchsorted(src_edges, centre) - 1
  j = np.searchsorted(grid_edges, centre) - 1
  a = seg * good[i]
  sum_a = np.bincount(j, a, grid.NUM_PIXELS)
  sum_af = np.bincount(j, a * flux[i], grid.NUM_PIXELS)
  measured = sum_a >= MIN_COVERAGE * np.diff(grid_edges)
  out_flux[measured] = sum_af[measured] / sum_a[measured]
  if has_ivar:
    # f_j = sum_i a_ij f_i / sum_i a_ij  =>  var_j = sum_i a_ij^2 / ivar_i / (sum_i a_ij)^2.
    var = np.divide(1.0, w, out=np.zeros_like(w), where=good)
    sum_a2v = np.bincount(j, a * a * var[i], grid.NUM_PIXELS)
    out_w[measured] = sum_a[measured] ** 2 / sum_a2v[measured]
  else:
    out_w[measured] = 1.0
  return out_flux, out_w


def resample_to_grid(wavelength: np.ndarray, flux: np.ndarray,
                     ivar: Optional[np.ndarray] = None,
                     and_mask: Optional[np.ndarray] = None):
  """Puts a spectrum on the fixed grid (`astra_jax.grid`): (flux (4000,), weight (4000,)) float32.

  Args:
    wavelength: (n,) Angstrom, vacuum observed frame, strictly increasing.
    flux: (n,) 1e-17 erg/s/cm^2/Angstrom.
    ivar: (n,) inverse variance of flux, or None (ASTROPIXEL CSV: no errors known).
    and_mask: (n,) SDSS AND mask, nonzero = bad, or None.
  Method:
    * On-lattice input (every log10(wavelength) within 1e-6 dex of LOGLAM0 + k * DLOGLAM, as
      SDSS coadds are): pixels are copied exactly to grid pixel k.
    * Otherwise flux-conserving bin averaging: source pixels are top-hats between log-midpoint
      edges; grid flux = overlap-weighted mean of the good source pixels, so integral(f dlambda)
      is conserved and a constant stays constant. With ivar, weight = 1 / var of that mean
      (source pixels independent; covariance between neighbouring grid pixels is ignored).
      A grid pixel less than half covered by good source pixels is unmeasured.
  Weights: ivar where the source has one, 1 where it has none; 0 where and_mask != 0, flux or
  ivar is non-finite or ivar <= 0, and outside the measured range. Flux is 0 wherever weight is 0.
  """
  wavelength = np.asarray(wavelength, np.float64)
  flux = np.asarray(flux, np.float64)
  if wavelength.ndim != 1 or flux.shape != wavelength.shape:
    raise ValueError(f"wavelength {wavelength.shape} and flux {flux.shape} must be equal (n,)")
  for name, extra in (("ivar", ivar), ("and_mask", and_mask)):
    if extra is not None and np.shape(extra) != wavelength.shape:
      raise ValueError(f"{name} shape {np.shape(extra)} != wavelength shape {wavelength.shape}")
  if wavelength.size and not (np.all(wavelength > 0) and np.all(np.diff(wavelength) > 0)):
    raise ValueError("wavelength must be positive and strictly increasing")
  ivar = None if ivar is None else np.asarray(ivar, np.float64)
  flux, good, w = _source_weights(flux, ivar, and_mask)
  loglam = np.log10(wavelength)
  idx = _on_lattice_index(loglam)
  if idx is not None:
    return _copy_on_lattice(idx, flux, good, w)
  return _bin_average(loglam, flux, good, w, ivar is not None)


#: Diameter of the photometric aperture: the SDSS fiber's 3 arcsec.
APERTURE_DIAMETER_ARCSEC = 3.0


@functools.lru_cache(maxsize=8)
def _aperture_pixels(h: int, w: int, diameter_arcsec: float, pixel_scale_arcsec: float):
  """Flat indices into (h, w) of the pixels whose centre is within the centred aperture
  (read-only, cached)."""
  yy, xx = np.mgrid[:h, :w]
  r2 = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2
  inside = np.flatnonzero(r2 <= (0.5 * diameter_arcsec / pixel_scale_arcsec) ** 2)
  inside.flags.writeable = False
  return inside


def aperture_flux(images: np.ndarray, headers, diameter_arcsec: float = APERTURE_DIAMETER_ARCSEC,
                  pixel_scale_arcsec: float = PS1_PIXEL_SCALE_ARCSEC) -> np.ndarray:
  """Flux in a centred circular aperture per band, in nanomaggies (AB mag = 22.5 - 2.5 log10 f).

  images: (bands, H, W) linear, sky-subtracted counts; headers: per band (`zero_point`).
  Pixels count whole if their centre is inside the aperture; non-finite pixels count as 0.
  Returns (bands,) float32, NaN for a band without a zero point.
  """
  images = np.asarray(images)
  inside = _aperture_pixels(images.shape[1], images.shape[2], diameter_arcsec, pixel_scale_arcsec)
  # Only the aperture's pixels (~110 for 3" at 0.25"/px) are read, and summed in float64.
  selected = images.reshape(len(images), -1)[:, inside].astype(np.float64)
  counts = np.where(np.isfinite(selected), selected, 0.0).sum(axis=1)
  return (counts * nmgy_per_count(zero_points(headers))).astype(np.float32)


def count_valid(weight: np.ndarray) -> int:
  """Number of grid pixels with weight > 0."""
  return int(np.count_nonzero(np.asarray(weight) > 0))


# --------------------------------------------------------------------------- splits


def split_of(specobj_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
  """Deterministic split of a galaxy: "train", "validation" or "test".

  u = first 8 bytes of sha256(specobj_id as ASCII decimal string), big-endian, / 2**64 is
  uniform in [0, 1); the split is the fractions bin u falls in. Depends on the id alone, so
  adding galaxies never moves old ones (changing `fractions` does move some).
  """
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
  digest = hashlib.sha256(str(specobj_id).strip().encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  if u < fractions[0]:
    return SPLITS[0]
  if u < fractions[0] + fractions[1]:
    return SPLITS[1]
  return SPLITS[2]
