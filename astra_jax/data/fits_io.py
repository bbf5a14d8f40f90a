"""Readers for the raw ASTROPIXEL / SDSS files: catalog CSV, PS1 FITS cutouts, spectra.

Layout of one raw directory (the mock generator writes exactly this; the Kaggle data look the same):

  RAW/data.csv                                          #plate,mjd,fiberid,specobj_id,ra,dec[,z]
  RAW/Galaxy_{id}/images/{id}_{band}.fits               PS1 cutout, 2-D float32, linear flux
  RAW/Galaxy_{id}/spectrum/spectrum.csv                 wavelength,flux
  RAW/Galaxy_{id}/spectrum/spec-PPPP-MMMMM-FFFF.fits    optional SDSS DR16 lite spectrum

Units: wavelengths in Angstrom (vacuum, observed frame), flux densities and their inverse
variances in (1e-17 erg/s/cm^2/Angstrom)^(+1, -2). Images are returned as float32 in the linear
flux units of the cutout (header BUNIT, zero point MAGZERO).

Every malformed input raises `InputError` with a stable `reason` phrase (the module-level
constants below); the dataset builder writes these reasons to its rejection file.

RAW may be a URL (gs://bucket/astropixel) as well as a local folder: a URL's files are read
through `etils.epath`, each whole in one request; local files as before (FITS memory-mapped).
"""

import dataclasses
import glob
import gzip
import io
import math
import os
import re
import warnings
from typing import Optional, Sequence

from astropy.io import fits
from etils import epath
import numpy as np

from astra_jax import grid
from astra_jax import paths

# Stable rejection reasons (the builder aggregates on these exact strings).
MISSING_FILE = "missing file"
MISSING_BAND = "missing band file"
UNREADABLE_FITS = "unreadable or truncated FITS"
NO_IMAGE = "no 2-D image in FITS"
WRONG_SHAPE = "wrong image shape"
INCONSISTENT_SHAPES = "inconsistent image shapes across bands"
MISSING_SPECTRUM = "missing spectrum"
EMPTY_SPECTRUM = "empty spectrum"
NON_NUMERIC_SPECTRUM = "non-numeric spectrum"
NON_FINITE_WAVELENGTH = "non-finite or non-positive wavelengths"
NON_MONOTONIC = "non-monotonic wavelengths"
DUPLICATED_WAVELENGTH = "duplicated wavelengths"
MISSING_COLUMNS = "missing columns"
UNKNOWN_COLUMNS = "unknown columns"
BAD_ROW = "bad data.csv row"

REASONS = (MISSING_FILE, MISSING_BAND, UNREADABLE_FITS, NO_IMAGE, WRONG_SHAPE,
           INCONSISTENT_SHAPES, MISSING_SPECTRUM, EMPTY_SPECTRUM, NON_NUMERIC_SPECTRUM,
           NON_FINITE_WAVELENGTH, NON_MONOTONIC, DUPLICATED_WAVELENGTH, MISSING_COLUMNS,
           UNKNOWN_COLUMNS, BAD_ROW)

CATALOG_COLUMNS = ("plate", "mjd", "fiberid", "specobj_id", "ra", "dec")  # + optional "z"
#: Spectra taken on or after this MJD come from the BOSS spectrographs (2 arcsec fibers; first
#: light December 2009, MJD ~55170); before it, from the SDSS ones (3 arcsec; the last SDSS-II
#: plates were observed in July 2008, MJD ~54660).
BOSS_FIRST_MJD = 55000
#: Fiber diameters (arcsec) of the SDSS and BOSS spectrographs: `fiber_diameter_arcsec`.
SDSS_FIBER_ARCSEC, BOSS_FIBER_ARCSEC = 3.0, 2.0
FIBER_DIAMETERS_ARCSEC = (BOSS_FIBER_ARCSEC, SDSS_FIBER_ARCSEC)
SPECTRUM_CSV_COLUMNS = ("wavelength", "flux")  # + optional "ivar", "and_mask"
_SPECTRUM_CSV_OPTIONAL = ("ivar", "and_mask")


class InputError(ValueError):
  """Malformed raw input. `str(err) == f"{path}: {reason}"` (+ `f" ({detail})"` when given).

  Attributes: path (str, the offending file), reason (one of the constants above),
  detail (str or None, free text for humans), line (int or None, 1-based line in a CSV).
  """

  def __init__(self, path, reason: str, detail: Optional[str] = None,
               line: Optional[int] = None):
    self.path = os.fspath(path)
    self.reason = reason
    self.detail = detail
    self.line = line
    msg = f"{self.path}: {reason}"
    super().__init__(msg if detail is None else f"{msg} ({detail})")

  def __reduce__(self):  # Keeps the attributes through pickling (multiprocessing workers).
    return (InputError, (self.path, self.reason, self.detail, self.line))


@dataclasses.dataclass(frozen=True)
class CatalogRow:
  """One data.csv row. ra, dec in degrees (ICRS); z is NaN when the file has no/blank z."""
  plate: int
  mjd: int
  fiberid: int
  specobj_id: str
  ra: float
  dec: float
  z: float = math.nan

  @property
  def has_z(self) -> bool:
    return math.isfinite(self.z)

  @property
  def fiber_diameter(self) -> float:
    """Diameter (arcsec) of the fiber that took the spectrum: `fiber_diameter_arcsec(mjd)`."""
    return fiber_diameter_arcsec(self.mjd)


def fiber_diameter_arcsec(mjd: int) -> float:
  """The spectrograph's fiber diameter (arcsec) on `mjd`: BOSS 2 on or after `BOSS_FIRST_MJD`,
  SDSS 3 before it."""
  return BOSS_FIBER_ARCSEC if mjd >= BOSS_FIRST_MJD else SDSS_FIBER_ARCSEC


@dataclasses.dataclass(frozen=True, eq=False)
class Spectrum:
  """A 1-D spectrum as read from disk (not yet on the grid).

  wavelength: (n,) float64 Angstrom, vacuum observed frame, strictly increasing.
  flux: (n,) float32, 1e-17 erg/s/cm^2/Angstrom (may contain NaN; resampling gives those weight 0).
  ivar: (n,) float32 inverse variance of flux, or None (ASTROPIXEL CSV).
  and_mask: (n,) int32 SDSS AND mask bits (0 = good), or None.
  z: pipeline redshift from the file (SDSS SPALL Z), NaN if the file has none.
  path: file it was read from.
  """
  wavelength: np.ndarray
  flux: np.ndarray
  ivar: Optional[np.ndarray]
  and_mask: Optional[np.ndarray]
  z: float
  path: str


@dataclasses.dataclass(frozen=True, eq=False)
class Galaxy:
  """Everything read for one galaxy.

  images: (len(bands), H, W) float32 linear flux, bands in the order of `bands`.
  headers: per band, the astropy `fits.Header`.
  spectrum: None only if read with require_spectrum=False and none was found.
  row: the data.csv row passed in (None if none).
  path: the galaxy directory.
  """
  specobj_id: str
  bands: tuple
  images: np.ndarray
  headers: tuple
  spectrum: Optional[Spectrum]
  row: Optional[CatalogRow]
  path: str


# --------------------------------------------------------------------------- catalog (data.csv)


def _unquote(field: str) -> str:
  field = field.strip()
  if len(field) >= 2 and field[0] == field[-1] and field[0] in "'\"":
    return field[1:-1].strip()
  return field


def _parse_row(fields, col, has_z) -> CatalogRow:
  """Raises ValueError on anything unparseable or out of range."""
  specobj_id = _unquote(fields[col["specobj_id"]])
  if not specobj_id.isdigit():
    raise ValueError(f"specobj_id {specobj_id!r} is not a bare integer")
  ra, dec = float(_unquote(fields[col["ra"]])), float(_unquote(fields[col["dec"]]))
  if not (0.0 <= ra <= 360.0 and -90.0 <= dec <= 90.0):  # Also rejects NaN.
    raise ValueError(f"ra, dec = {ra}, {dec} out of range")
  z = math.nan
  if has_z:
    z_text = _unquote(fields[col["z"]])
    z = float(z_text) if z_text else math.nan
  return CatalogRow(plate=int(_unquote(fields[col["plate"]])),
                    mjd=int(_unquote(fields[col["mjd"]])),
                    fiberid=int(_unquote(fields[col["fiberid"]])),
                    specobj_id=specobj_id, ra=ra, dec=dec, z=z)


def read_catalog_rows(path) -> list:
  """Reads data.csv, one result per data row: `CatalogRow` or the row's `InputError`.

  Accepts the CasJobs forms `266,51630,1,'299489677444933632',...` and fully quoted ids
  (`'266'`), a leading `#` on the header, header names in any case and order, extra columns
  (ignored) and a missing `z` column (z = NaN). Blank and `#` comment lines are skipped.
  A bad row gives InputError(path, BAD_ROW, line=<1-based line number>) in its place, so the
  builder can reject that row alone. Raises InputError for a missing file (MISSING_FILE) or a
  header lacking a required column (MISSING_COLUMNS): those spoil the whole file.
  """
  path = os.fspath(path)
  try:
    with paths.open_text(path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    raise InputError(path, MISSING_FILE) from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(path, BAD_ROW, detail=f"unreadable: {e}") from None
  header_idx = next((i for i, l in enumerate(lines) if l.strip()), None)
  if header_idx is None:
    raise InputError(path, MISSING_COLUMNS, detail="empty file")
  names = [_unquote(n).lstrip("#").strip().lower() for n in lines[header_idx].split(",")]
  col = {n: i for i, n in enumerate(names)}
  missing = [c for c in CATALOG_COLUMNS if c not in col]
  if missing:
    raise InputError(path, MISSING_COLUMNS, detail=f"need {', '.join(missing)}; got {names}")
  has_z = "z" in col
  results = []
  for i in range(header_idx + 1, len(lines)):
    text = lines[i].strip()
    if not text or text.startswith("#"):
      continue
    fields = text.split(",")
    try:
      if len(fields) != len(names):
        raise ValueError(f"{len(fields)} fields, header has {len(names)}")
      results.append(_parse_row(fields, col, has_z))
    except ValueError as e:
      results.append(InputError(path, BAD_ROW, detail=f"line {i + 1}: {e}", line=i + 1))
  return results


def read_catalog(path) -> list:
  """Reads data.csv strictly: list of `CatalogRow` in file order.

  Raises the first bad row's InputError (reason BAD_ROW, `.line` = its line number).
  Use `read_catalog_rows` to reject bad rows one by one instead of the whole file.
  """
  rows = read_catalog_rows(path)
  for r in rows:
    if isinstance(r, InputError):
      raise r
  return rows


# --------------------------------------------------------------------------- FITS images


def _first_image(hdul):
  """(data (H, W) float32, header) of the first HDU with 2-D data, or None: the primary, an image
  extension or a tile-compressed one; a (1, H, W) cube counts as 2-D."""
  for hdu in hdul:
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
      continue
    data = hdu.data
    if data is None:
      continue
    if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):
      data = data.reshape(data.shape[-2:])
    if data.ndim == 2 and data.size > 0:
      return data.astype(np.float32), hdu.header
  return None


def _fits_source(path: str):
  """What `fits.open` reads for `path`: a local path as it is (astropy memory-maps it), a URL's
  bytes read whole (one request; a 288 x 288 float32 cutout is 0.3 MB). Raises
  FileNotFoundError."""
  if not paths.is_url(path):
    return path
  data = io.BytesIO(epath.Path(path).read_bytes())
  # astropy recognises gzip by its magic bytes in a file it opens, not in a file object.
  return gzip.GzipFile(fileobj=data) if data.getbuffer()[:2] == b"\x1f\x8b" else data


def read_image(path):
  """Reads a PS1 cutout with astropy: (image (H, W) float32 linear flux, fits.Header).

  The first HDU with 2-D data (primary, image extension, tile-compressed .fits.fz, gzipped
  .fits.gz); integer images come scaled by BSCALE/BZERO, BLANK pixels NaN. Raises InputError:
  MISSING_BAND (no file), UNREADABLE_FITS (not FITS, truncated), NO_IMAGE.
  """
  path = os.fspath(path)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with fits.open(_fits_source(path)) as hdul:
        found = _first_image(hdul)
  except FileNotFoundError:
    raise InputError(path, MISSING_BAND) from None
  except Exception as e:  # astropy raises OSError, ValueError, TypeError, ... on bad files.
    raise InputError(path, UNREADABLE_FITS, detail=f"{type(e).__name__}: {e}") from None
  if any("truncated" in str(w.message) for w in caught):
    raise InputError(path, UNREADABLE_FITS, detail="truncated")
  if found is None:
    raise InputError(path, NO_IMAGE)
  return found


def band_file(folder, specobj_id: str, band: str) -> str:
  """`folder/{specobj_id}_{band}.fits`, or its .fits.fz / .fits.gz sibling when only that exists."""
  base = os.path.join(os.fspath(folder), f"{specobj_id}_{band}.fits")
  if not paths.is_file(base):
    for alt in (base + ".fz", base + ".gz"):
      if paths.is_file(alt):
        return alt
  return base


def band_path(galaxy_dir, specobj_id: str, band: str) -> str:
  """Path of one band's cutout in a Galaxy_ folder: `band_file` of its images/ folder."""
  return band_file(os.path.join(os.fspath(galaxy_dir), "images"), specobj_id, band)


def read_bands(paths: Sequence[str], bands: Sequence[str],
               shape: Optional[Sequence[int]] = None):
  """Reads one cutout per band: (images (len(bands), H, W) float32, tuple of fits.Headers).

  `paths[k]` holds band `bands[k]`; the images are stacked in that order. Raises InputError as
  `read_image` does, WRONG_SHAPE (the first band's differs from `shape` = (H, W) when given) and
  INCONSISTENT_SHAPES (a later band's differs from the first's).
  """
  if not bands:
    raise ValueError("no bands requested")
  images, headers = [], []
  for band, path in zip(bands, paths, strict=True):
    image, header = read_image(path)
    if not images and shape is not None and image.shape != tuple(shape):
      raise InputError(path, WRONG_SHAPE, detail=f"{image.shape}, expected {tuple(shape)}")
    if images and image.shape != images[0].shape:
      raise InputError(path, INCONSISTENT_SHAPES,
                       detail=f"{band}: {image.shape} vs {bands[0]}: {images[0].shape}")
    images.append(image)
    headers.append(header)
  return np.stack(images), tuple(headers)


def read_images(galaxy_dir, specobj_id: str, bands: Sequence[str] = grid.PS1_BANDS,
                shape: Optional[Sequence[int]] = None):
  """Reads all bands of a Galaxy_ folder (`band_path`): `read_bands`'s (images, headers).

  Bands are stacked in the order given (never directory-listing order). Raises InputError:
  MISSING_BAND, UNREADABLE_FITS, NO_IMAGE, INCONSISTENT_SHAPES (bands differ), WRONG_SHAPE
  (differs from `shape` = (H, W) when given).
  """
  return read_bands([band_path(galaxy_dir, specobj_id, b) for b in bands], bands, shape)


def image_ra_dec(header, shape: Optional[Sequence[int]] = None):
  """(ra, dec) in degrees of the image centre, from the header's celestial WCS.

  The centre is pixel ((W - 1) / 2, (H - 1) / 2) 0-based; (H, W) = `shape` or the header's
  NAXIS2, NAXIS1. Accepts a fits.Header or a plain dict of cards.
  """
  from astropy import wcs  # Lazy: only the prediction tool needs it; import costs ~0.1 s.
  if not isinstance(header, fits.Header):
    header = fits.Header(dict(header))
  if shape is None:
    shape = (header["NAXIS2"], header["NAXIS1"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", wcs.FITSFixedWarning)
    w = wcs.WCS(header, naxis=2)
  ra, dec = w.all_pix2world([(shape[1] - 1) / 2.0], [(shape[0] - 1) / 2.0], 0)
  return float(ra[0]), float(dec[0])


# --------------------------------------------------------------------------- spectra


def _checked_spectrum(path, wavelength, flux, ivar, and_mask, z) -> Spectrum:
  """Validates the wavelength axis and packs a Spectrum (raises InputError)."""
  if wavelength.size == 0:
    raise InputError(path, EMPTY_SPECTRUM)
  if not np.all(np.isfinite(wavelength)) or np.any(wavelength <= 0):
    raise InputError(path, NON_FINITE_WAVELENGTH)
  step = np.diff(wavelength)
  if np.any(step < 0):
    i = int(np.argmax(step < 0))
    raise InputError(path, NON_MONOTONIC, detail=f"row {i + 1}: {wavelength[i + 1]} after "
                     f"{wavelength[i]}")
  if np.any(step == 0):
    i = int(np.argmax(step == 0))
    raise InputError(path, DUPLICATED_WAVELENGTH, detail=f"{wavelength[i]} twice")
  return Spectrum(wavelength=wavelength, flux=flux.astype(np.float32), z=float(z), path=path,
                  ivar=None if ivar is None else ivar.astype(np.float32),
                  and_mask=None if and_mask is None else and_mask.astype(np.int32))


def read_spectrum_csv(path) -> Spectrum:
  """Reads ASTROPIXEL spectrum.csv (header `wavelength,flux`): Spectrum with ivar None, z NaN.

  Optional `ivar` and `and_mask` columns are read when present; other columns are rejected.
  Parsed by numpy's C loadtxt (~1 ms for 4000 rows). Raises InputError: MISSING_SPECTRUM,
  MISSING_COLUMNS, UNKNOWN_COLUMNS, EMPTY_SPECTRUM (header only), NON_NUMERIC_SPECTRUM
  (unparseable or missing field, ragged rows), NON_FINITE_WAVELENGTH, NON_MONOTONIC,
  DUPLICATED_WAVELENGTH (wavelengths must be strictly increasing).
  """
  path = os.fspath(path)
  try:
    with paths.open_text(path) as f:
      head = f.readline()
      if not head.strip():
        raise InputError(path, EMPTY_SPECTRUM, detail="empty file")
      names = [_unquote(n).lstrip("#").strip().lower() for n in head.split(",")]
      missing = [c for c in SPECTRUM_CSV_COLUMNS if c not in names]
      if missing:
        raise InputError(path, MISSING_COLUMNS, detail=f"need {', '.join(missing)}; got {names}")
      unknown = [c for c in names if c not in SPECTRUM_CSV_COLUMNS + _SPECTRUM_CSV_OPTIONAL]
      if unknown or len(set(names)) != len(names):
        raise InputError(path, UNKNOWN_COLUMNS, detail=f"got {names}")
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below.
        values = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
  except FileNotFoundError:
    raise InputError(path, MISSING_SPECTRUM) from None
  except InputError:
    raise
  except (ValueError, UnicodeDecodeError) as e:  # loadtxt names the row and column.
    raise InputError(path, NON_NUMERIC_SPECTRUM, detail=str(e).split(";")[0]) from None
  except OSError as e:
    raise InputError(path, NON_NUMERIC_SPECTRUM, detail=f"unreadable: {e}") from None
  if values.size == 0:
    raise InputError(path, EMPTY_SPECTRUM)
  if values.shape[1] != len(names):
    raise InputError(path, NON_NUMERIC_SPECTRUM,
                     detail=f"{values.shape[1]} fields per row, header has {len(names)}")
  cols = {n: values[:, i] for i, n in enumerate(names)}
  and_mask = cols.get("and_mask")
  if and_mask is not None and not np.all(np.isfinite(and_mask)):
    raise InputError(path, NON_NUMERIC_SPECTRUM, detail="non-finite and_mask")
  return _checked_spectrum(path, np.ascontiguousarray(cols["wavelength"]), cols["flux"],
                           cols.get("ivar"), and_mask, math.nan)


_LITE_COLUMNS = ("flux", "loglam", "ivar", "and_mask")  # COADD columns read; flux, loglam required


def _table_hdu(hdul, name: str, index: int):
  """The table HDU called `name` (any case), else the one at `index`, else None."""
  for hdu in hdul:
    if hdu.name.upper() == name and isinstance(hdu, fits.BinTableHDU):
      return hdu
  if index < len(hdul) and isinstance(hdul[index], (fits.BinTableHDU, fits.TableHDU)):
    return hdul[index]
  return None


def _table_columns(hdu, wanted: Sequence[str]) -> dict:
  """{lower name: native-endian array} of the `wanted` columns present in a table HDU."""
  data = hdu.data
  columns = {}
  for n in data.columns.names:
    if n.lower() in wanted:
      values = np.asarray(data.field(n))
      columns[n.lower()] = values.astype(values.dtype.newbyteorder("="))
  return columns


def _read_lite_tables(path: str):
  """(COADD columns, COADD column names, SPALL columns or None) of a lite file; COADD None when
  the file has no table. Raises ValueError("truncated") for a file cut short."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fits.open(_fits_source(path)) as hdul:
      coadd = _table_hdu(hdul, "COADD", 1)
      if coadd is None:
        return None, [], None
      spall = _table_hdu(hdul, "SPALL", 2)
      result = (_table_columns(coadd, _LITE_COLUMNS), list(coadd.columns.names),
                None if spall is None else _table_columns(spall, ("z",)))
  if any("truncated" in str(w.message) for w in caught):
    raise ValueError("truncated")
  return result


def read_sdss_spec(path) -> Spectrum:
  """Reads an SDSS DR16 lite spec-PPPP-MMMMM-FFFF.fits with astropy.

  HDU `COADD` (else HDU 1): wavelength = 10**loglam Angstrom (float64), flux, ivar, and_mask
  (column names in any case). HDU `SPALL` (else HDU 2): z = first row's Z (NaN if absent).
  flux and loglam are required; ivar, and_mask may be absent (None). Raises InputError:
  MISSING_SPECTRUM, UNREADABLE_FITS, MISSING_COLUMNS (no COADD table or no flux/loglam),
  EMPTY_SPECTRUM, NON_FINITE_WAVELENGTH, NON_MONOTONIC, DUPLICATED_WAVELENGTH.
  """
  path = os.fspath(path)
  try:
    coadd, coadd_names, spall = _read_lite_tables(path)
  except FileNotFoundError:
    raise InputError(path, MISSING_SPECTRUM) from None
  except Exception as e:  # astropy raises OSError, ValueError, TypeError, ... on bad files.
    raise InputError(path, UNREADABLE_FITS, detail=f"{type(e).__name__}: {e}") from None
  if coadd is None:
    raise InputError(path, MISSING_COLUMNS, detail="no COADD table")
  if "flux" not in coadd or "loglam" not in coadd:
    raise InputError(path, MISSING_COLUMNS, detail=f"COADD needs flux, loglam; has {coadd_names}")
  z = math.nan
  if spall is not None and "z" in spall and spall["z"].size:
    z = float(spall["z"].ravel()[0])
  # float32 loglam (real lite files) is good to ~2e-7 dex: far inside the 1e-6 lattice test.
  wavelength = 10.0 ** coadd["loglam"].astype(np.float64)
  return _checked_spectrum(path, wavelength, coadd["flux"], coadd.get("ivar"),
                           coadd.get("and_mask"), z)


_SPEC_GLOB = "spec-*.fits"


def find_spectrum(galaxy_dir) -> Optional[str]:
  """Spectrum file of a galaxy: spectrum/spec-*.fits, else spec-*.fits in the galaxy folder,
  else spectrum/spectrum.csv; None if none exists. Several spec files: the first sorted name."""
  galaxy_dir = os.fspath(galaxy_dir)
  for folder in (os.path.join(galaxy_dir, "spectrum"), galaxy_dir):
    found = sorted(_glob(folder, _SPEC_GLOB))
    if found:
      return found[0]
  csv_path = os.path.join(galaxy_dir, "spectrum", "spectrum.csv")
  return csv_path if paths.is_file(csv_path) else None


def _glob(folder: str, pattern: str) -> list:
  """Paths (str) in `folder` whose names match `pattern`; none when `folder` does not exist."""
  if paths.is_url(folder):
    return [os.fspath(p) for p in epath.Path(folder).glob(pattern)]
  return glob.glob(os.path.join(folder, pattern))


def read_spectrum(path) -> Spectrum:
  """Dispatches on the file name: *.fits -> read_sdss_spec, else read_spectrum_csv."""
  path = os.fspath(path)
  return read_sdss_spec(path) if path.endswith(".fits") else read_spectrum_csv(path)


_GALAXY_DIR = re.compile(r"Galaxy_'?(\d+)'?$")


def read_galaxy(galaxy_dir, bands: Sequence[str] = grid.PS1_BANDS,
                row: Optional[CatalogRow] = None,
                image_shape: Optional[Sequence[int]] = None,
                require_spectrum: bool = True) -> Galaxy:
  """Reads one Galaxy_{id} folder: images (all `bands`) and spectrum (`find_spectrum`).

  specobj_id comes from `row` when given, else from the folder name. Raises InputError as
  read_images / read_spectrum_csv / read_sdss_spec do, and MISSING_SPECTRUM (path: the folder's
  spectrum/spectrum.csv) when no spectrum exists and require_spectrum (False for prediction on
  images alone: spectrum None).
  """
  galaxy_dir = os.fspath(galaxy_dir)
  if row is not None:
    specobj_id = row.specobj_id
  else:
    m = _GALAXY_DIR.search(os.path.basename(os.path.normpath(galaxy_dir)))
    if m is None:
      raise InputError(galaxy_dir, MISSING_FILE, detail="folder name is not Galaxy_{specobj_id}")
    specobj_id = m.group(1)
  images, headers = read_images(galaxy_dir, specobj_id, bands, image_shape)
  spec_path = find_spectrum(galaxy_dir)
  if spec_path is None:
    if require_spectrum:
      raise InputError(os.path.join(galaxy_dir, "spectrum", "spectrum.csv"), MISSING_SPECTRUM)
    spectrum = None
  else:
    spectrum = read_spectrum(spec_path)
  return Galaxy(specobj_id=specobj_id, bands=tuple(bands), images=images, headers=headers,
                spectrum=spectrum, row=row, path=galaxy_dir)


def galaxy_path(raw_dir, specobj_id: str) -> str:
  """RAW/Galaxy_{specobj_id}."""
  return os.path.join(os.fspath(raw_dir), f"Galaxy_{specobj_id}")
