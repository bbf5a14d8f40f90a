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
"""

import dataclasses
import glob
import math
import os
import re
import warnings
from typing import Optional, Sequence

import numpy as np
from astropy.io import fits

from astra_jax import grid

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
  headers: per band, an astropy `fits.Header`, or a dict of the keys asked for (`header_keys`).
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
    with open(path, encoding="utf-8-sig") as f:
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

_BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_CARD = 80
_BLOCK = 2880
_FAST_KEYS = (b"BITPIX", b"NAXIS", b"NAXIS1", b"NAXIS2", b"NAXIS3", b"BSCALE", b"BZERO",
              b"BLANK", b"GROUPS")


def _card_number(card: bytes):
  value = card[10:].split(b"/", 1)[0].strip()
  return float(value) if b"." in value or b"E" in value.upper() else int(value)


def _read_primary_fast(f, out: Optional[np.ndarray] = None,
                       header_keys: Optional[Sequence[str]] = None):
  """Decodes a plain uncompressed 2-D primary HDU from open binary file `f`; None when the file
  needs astropy (other layouts, or not FITS at all: astropy then names the problem).

  Astropy's generic open costs ~1.2 ms per cutout (6 ms per galaxy); this costs ~0.35 ms and
  handles only the layout of PS1 stack cutouts and the mock. Returns (data (H, W) float32,
  header), data being `out` itself when it is a C-contiguous float32 array of the image's
  shape and the image is unscaled float32; header a fits.Header, or with `header_keys` (standard
  keywords) a dict of those present, whose cards alone are parsed (a whole fits.Header takes
  ~0.17 ms for the mock's 31 cards, more for a survey's longer headers). Raises ValueError when
  the header is complete but the data are cut short.
  """
  wanted = None if header_keys is None else {k.encode("ascii") for k in header_keys}
  picked = {}
  keys = {}
  head = b""
  end = None
  while end is None:
    block = f.read(_BLOCK)
    if not head and (not block.startswith(b"SIMPLE  =") or block[10:30].strip() != b"T"):
      return None
    if len(block) < _BLOCK or len(head) > 100 * _BLOCK:
      return None  # Truncated header, or absurdly long: astropy decides.
    for pos in range(0, _BLOCK, _CARD):
      card = block[pos:pos + _CARD]
      key = card[:8].rstrip()
      if key == b"END":
        end = len(head) + pos + _CARD
        break
      if key in _FAST_KEYS and card[8:10] == b"= ":
        try:
          keys[key.decode()] = _card_number(card)
        except ValueError:
          return None
      if wanted is not None and key in wanted and card[8:10] == b"= ":  # The first one counts.
        picked.setdefault(key.decode(), fits.Card.fromstring(card.decode("ascii", "replace")).value)
    head += block
  naxis = keys.get("NAXIS", 0)
  if "GROUPS" in keys or naxis not in (2, 3) or keys.get("BITPIX") not in _BITPIX_DTYPES:
    return None
  shape = tuple(int(keys.get(f"NAXIS{k}", 0)) for k in range(naxis, 0, -1))
  if naxis == 3 and shape[0] != 1:
    return None
  shape = shape[-2:]
  if min(shape) <= 0:
    return None
  dtype = np.dtype(_BITPIX_DTYPES[keys["BITPIX"]])
  data_start = len(head)  # Header blocks consumed so far; the data start right after.
  if os.fstat(f.fileno()).st_size < data_start + dtype.itemsize * shape[0] * shape[1]:
    raise ValueError("truncated")  # Checked before allocating: a corrupt NAXIS can be huge.
  bscale, bzero = keys.get("BSCALE", 1), keys.get("BZERO", 0)
  direct = (out is not None and out.dtype == np.float32 and out.shape == shape
            and out.flags.c_contiguous and keys["BITPIX"] == -32 and (bscale, bzero) == (1, 0))
  data = out.view(dtype) if direct else np.empty(shape, dtype)  # Saves a copy per band.
  if f.readinto(data.view(np.uint8).reshape(-1)) < data.nbytes:
    raise ValueError("truncated")
  data = data.byteswap(inplace=True).view(dtype.newbyteorder("="))  # Big-endian on disk.
  if keys["BITPIX"] > 0:  # Integer image: apply BLANK and the linear scaling in float.
    out = data.astype(np.float64) * bscale + bzero
    if "BLANK" in keys:
      out[data == keys["BLANK"]] = np.nan
    data = out
  elif (bscale, bzero) != (1, 0):
    data = data.astype(np.float64) * bscale + bzero
  if wanted is None:
    header = fits.Header.fromstring(head[:end].decode("ascii", errors="replace"))
  else:
    header = picked
  return (out if direct else data.astype(np.float32, copy=False)), header


def _read_image_astropy(path: str):
  """First HDU with 2-D data (primary, image extension or tile-compressed), via astropy."""
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with fits.open(path, memmap=False) as hdul:
        for hdu in hdul:
          if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
          data = hdu.data
          if data is None:
            continue
          data = np.asarray(data)
          if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):  # (1, H, W) cubes.
            data = data.reshape(data.shape[-2:])
          if data.ndim == 2 and data.size > 0:
            return data.astype(np.float32), hdu.header.copy()
  except InputError:
    raise
  except Exception as e:  # astropy raises OSError, ValueError, TypeError, ... on bad files.
    raise InputError(path, UNREADABLE_FITS, detail=f"{type(e).__name__}: {e}") from None
  if any("truncated" in str(w.message) for w in caught):
    raise InputError(path, UNREADABLE_FITS, detail="truncated")
  raise InputError(path, NO_IMAGE)


def read_image(path, out: Optional[np.ndarray] = None,
               header_keys: Optional[Sequence[str]] = None):
  """Reads a PS1 cutout: (image (H, W) float32 linear flux, header).

  Plain primary-HDU images take a fast path; anything else (image in HDU 1, tile compression,
  gzip) goes through astropy, taking the first HDU with 2-D data. `out` (optional, (H, W)
  float32) is filled and returned as the image when the fast path can decode into it. header:
  the astropy fits.Header, or with `header_keys` (standard 8-character keywords) a dict of those
  of them that the header has. Raises InputError: MISSING_BAND (no file), UNREADABLE_FITS
  (garbage, truncated), NO_IMAGE.
  """
  path = os.fspath(path)
  if header_keys is not None and not all(k == k.upper() and len(k) <= 8 for k in header_keys):
    raise ValueError(f"header_keys must be standard FITS keywords, got {header_keys}")
  try:
    with open(path, "rb") as f:
      fast = _read_primary_fast(f, out, header_keys)
  except FileNotFoundError:
    raise InputError(path, MISSING_BAND) from None
  except ValueError:
    raise InputError(path, UNREADABLE_FITS, detail="truncated") from None
  except OSError as e:
    raise InputError(path, UNREADABLE_FITS, detail=str(e)) from None
  if fast is not None:
    return fast
  image, header = _read_image_astropy(path)
  if header_keys is not None:
    header = {k: header[k] for k in header_keys if k in header}
  return image, header


def band_path(galaxy_dir, specobj_id: str, band: str) -> str:
  """Path of one band's cutout; falls back to .fits.fz / .fits.gz when the .fits is absent."""
  base = os.path.join(os.fspath(galaxy_dir), "images", f"{specobj_id}_{band}.fits")
  if not os.path.exists(base):
    for alt in (base + ".fz", base + ".gz"):
      if os.path.exists(alt):
        return alt
  return base


def read_images(galaxy_dir, specobj_id: str, bands: Sequence[str] = grid.PS1_BANDS,
                shape: Optional[Sequence[int]] = None,
                header_keys: Optional[Sequence[str]] = None):
  """Reads all bands: (images (len(bands), H, W) float32, tuple of headers as `read_image`
  returns them: fits.Header, or dicts of `header_keys`).

  Bands are stacked in the order given (never directory-listing order). Raises InputError:
  MISSING_BAND, UNREADABLE_FITS, NO_IMAGE, INCONSISTENT_SHAPES (bands differ), WRONG_SHAPE
  (differs from `shape` = (H, W) when given).
  """
  images, headers = None, []
  for k, band in enumerate(bands):
    path = band_path(galaxy_dir, specobj_id, band)
    slot = None if images is None else images[k]
    image, header = read_image(path, out=slot, header_keys=header_keys)
    if images is None:
      if shape is not None and image.shape != tuple(shape):
        raise InputError(path, WRONG_SHAPE, detail=f"{image.shape}, expected {tuple(shape)}")
      images = np.empty((len(bands),) + image.shape, np.float32)
      images[0] = image
    elif image is not slot:  # Decoded elsewhere (astropy path or a different shape).
      if image.shape != images.shape[1:]:
        raise InputError(path, INCONSISTENT_SHAPES,
                         detail=f"{band}: {image.shape} vs {bands[0]}: {images.shape[1:]}")
      images[k] = image
    headers.append(header)
  if images is None:
    raise ValueError("no bands requested")
  return images, tuple(headers)


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
    with open(path, encoding="utf-8-sig") as f:
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
_TFORM = re.compile(r"\s*(\d*)\s*([LXBIJKAEDCMPQ])")
_TFORM_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16,
                "P": 8, "Q": 16}
_TFORM_DTYPES = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def _card_value(text: str):
  """Value of a header card (text after '= '): str (quotes removed), int or float."""
  text = text.strip()
  if text.startswith("'"):
    return text[1:].split("'", 1)[0].rstrip()  # Good enough: no '' escapes in the keys used.
  value = text.split("/", 1)[0].strip()
  return float(value) if "." in value or "E" in value.upper() else int(value)


def _read_header_cards(f) -> dict:
  """Keyword -> raw value text of the next HDU header in binary file `f` (positioned at it)."""
  cards = {}
  for _ in range(1000):
    block = f.read(_BLOCK)
    if len(block) < _BLOCK:
      raise ValueError("truncated header")
    for pos in range(0, _BLOCK, _CARD):
      card = block[pos:pos + _CARD].decode("ascii", errors="replace")
      key = card[:8].rstrip()
      if key == "END":
        return cards
      if card[8:10] == "= ":
        cards.setdefault(key, card[10:])
  raise ValueError("header too long")


def _hdu_data_bytes(cards: dict) -> int:
  """Bytes of the HDU's data + heap, padded to whole FITS blocks."""
  naxis = _card_value(cards.get("NAXIS", "0"))
  if naxis == 0:
    return 0
  size = abs(_card_value(cards["BITPIX"])) // 8
  for k in range(1, naxis + 1):
    size *= _card_value(cards[f"NAXIS{k}"])
  size += _card_value(cards.get("PCOUNT", "0"))
  return -(-size // _BLOCK) * _BLOCK


def _bintable_fast(f, cards: dict, wanted: Sequence[str]):
  """({lower name: native (rows,) array} for the `wanted` scalar columns present, all column
  names), reading the table data from `f`; None if a wanted column needs astropy."""
  ncols = _card_value(cards["TFIELDS"])
  rowbytes, nrows = _card_value(cards["NAXIS1"]), _card_value(cards["NAXIS2"])
  names, layout, offset = [], {}, 0
  for k in range(1, ncols + 1):
    name = _card_value(cards.get(f"TTYPE{k}", "''"))
    m = _TFORM.match(_card_value(cards[f"TFORM{k}"]))
    if m is None:
      return None
    repeat, code = int(m.group(1) or 1), m.group(2)
    width = -(-repeat // 8) if code == "X" else repeat * _TFORM_BYTES[code]
    names.append(name)
    if name.lower() in wanted:
      scaled = f"TSCAL{k}" in cards or f"TZERO{k}" in cards
      if repeat != 1 or code not in _TFORM_DTYPES or scaled:
        return None
      layout[name.lower()] = (_TFORM_DTYPES[code], offset)
    offset += width
  if offset != rowbytes:
    return None
  data = f.read(rowbytes * nrows)
  if len(data) < rowbytes * nrows:
    return None  # Truncated: astropy words the error.
  columns = {}
  for name, (dtype, start) in layout.items():
    column = np.ndarray((nrows,), np.dtype(dtype), data, start, (rowbytes,))
    columns[name] = column.astype(np.dtype(dtype).newbyteorder("="))
  return columns, names


def _read_lite_fast(path: str):
  """(COADD columns, COADD names, SPALL columns or None) for a plain lite file whose HDU 1 is
  the COADD table and HDU 2 (if any) SPALL; None for any other layout (astropy reads it).

  fits.open + BinTableHDU cost ~10 ms per file; this ~0.3 ms.
  """
  try:
    with open(path, "rb") as f:
      cards = _read_header_cards(f)
      if cards.get("SIMPLE", "").strip()[:1] != "T":
        return None
      f.seek(_hdu_data_bytes(cards), os.SEEK_CUR)
      tables = []
      for index, name in ((1, "COADD"), (2, "SPALL")):
        start = f.tell()
        if not f.read(1):
          break  # No more HDUs.
        f.seek(start)
        cards = _read_header_cards(f)
        extname = _card_value(cards.get("EXTNAME", "''")).upper()
        if _card_value(cards.get("XTENSION", "''")) != "BINTABLE" or extname not in (name, ""):
          return None
        data_start = f.tell()
        table = _bintable_fast(f, cards, _LITE_COLUMNS if index == 1 else ("z",))
        if table is None:
          return None
        tables.append(table)
        f.seek(data_start + _hdu_data_bytes(cards))
  except (ValueError, KeyError, OSError):
    return None
  if not tables:
    return None
  return tables[0][0], tables[0][1], tables[1][0] if len(tables) > 1 else None


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


def _read_lite_astropy(path: str):
  """As _read_lite_fast, via astropy, for any layout; COADD None if the file has no table."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with fits.open(path, memmap=False) as hdul:
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
  """Reads an SDSS DR16 lite spec-PPPP-MMMMM-FFFF.fits.

  HDU `COADD` (else HDU 1): wavelength = 10**loglam Angstrom (float64), flux, ivar, and_mask
  (column names in any case). HDU `SPALL` (else HDU 2): z = first row's Z (NaN if absent).
  flux and loglam are required; ivar, and_mask may be absent (None). The usual layout takes a
  fast path (~0.3 ms), others astropy (~10 ms). Raises InputError: MISSING_SPECTRUM,
  UNREADABLE_FITS, MISSING_COLUMNS (no COADD table or no flux/loglam), EMPTY_SPECTRUM,
  NON_FINITE_WAVELENGTH, NON_MONOTONIC, DUPLICATED_WAVELENGTH.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise InputError(path, MISSING_SPECTRUM)
  tables = _read_lite_fast(path)
  if tables is None:
    try:
      tables = _read_lite_astropy(path)
    except Exception as e:  # astropy raises OSError, ValueError, TypeError, ... on bad files.
      raise InputError(path, UNREADABLE_FITS, detail=f"{type(e).__name__}: {e}") from None
  coadd, coadd_names, spall = tables
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
  for pattern in (os.path.join(galaxy_dir, "spectrum", _SPEC_GLOB),
                  os.path.join(galaxy_dir, _SPEC_GLOB)):
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  csv_path = os.path.join(galaxy_dir, "spectrum", "spectrum.csv")
  return csv_path if os.path.exists(csv_path) else None


def read_spectrum(path) -> Spectrum:
  """Dispatches on the file name: *.fits -> read_sdss_spec, else read_spectrum_csv."""
  path = os.fspath(path)
  return read_sdss_spec(path) if path.endswith(".fits") else read_spectrum_csv(path)


_GALAXY_DIR = re.compile(r"Galaxy_'?(\d+)'?$")


def read_galaxy(galaxy_dir, bands: Sequence[str] = grid.PS1_BANDS,
                row: Optional[CatalogRow] = None,
                image_shape: Optional[Sequence[int]] = None,
                require_spectrum: bool = True,
                header_keys: Optional[Sequence[str]] = None) -> Galaxy:
  """Reads one Galaxy_{id} folder: images (all `bands`) and spectrum (`find_spectrum`).

  headers: whole fits.Headers, or dicts of `header_keys` (see `read_image`).

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
  images, headers = read_images(galaxy_dir, specobj_id, bands, image_shape, header_keys)
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
