"""Tests of astra_jax.data.fits_io on tiny files written in the raw ASTROPIXEL / SDSS formats."""

import gzip
import math
import os
import pickle

import numpy as np
import pytest
from astropy.io import fits

from astra_jax import grid
from astra_jax.data import fits_io
from astra_jax.data import preprocess

SID = "299489677444933632"


# --------------------------------------------------------------------------- file writers


def _header(band="g", exptime=100.0, ra=146.71421, dec=-1.0413043, shape=(12, 10)):
  h = fits.Header()
  h["EXPTIME"] = exptime
  h["MAGZERO"] = 25.0 + 2.5 * math.log10(exptime)
  h["BUNIT"] = "DN"
  h["FILTER"] = f"{band}.00000"
  for k, v in dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=ra, CRVAL2=dec,
                   CRPIX1=(shape[1] + 1) / 2, CRPIX2=(shape[0] + 1) / 2,
                   CD1_1=-0.25 / 3600, CD1_2=0.0, CD2_1=0.0, CD2_2=0.25 / 3600).items():
    h[k] = v
  return h


def write_image(path, data, band="g"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = np.asarray(data, np.float32)
  fits.PrimaryHDU(data, _header(band, shape=data.shape)).writeto(path, overwrite=True)
  return str(path)


def write_csv_spectrum(path, wavelength, flux, header="wavelength,flux"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(header + "\n")
    for w, v in zip(wavelength, flux):
      f.write(f"{float(w)!r},{float(v)!r}\n")
  return str(path)


def write_lite_spec(path, loglam, flux, ivar=None, and_mask=None, z=0.1, upper=False,
                    named=True, drop=()):
  """SDSS DR16 lite spec: COADD (flux, loglam, ivar, and_mask, ...) + SPALL (Z, Z_ERR, CLASS...)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  n = len(loglam)
  ivar = np.ones(n) if ivar is None else ivar
  and_mask = np.zeros(n, np.int32) if and_mask is None else and_mask
  cols = [("flux", "E", flux), ("loglam", "E", loglam), ("ivar", "E", ivar),
          ("and_mask", "J", and_mask), ("or_mask", "J", and_mask), ("model", "E", flux)]
  case = str.upper if upper else str
  coadd = fits.BinTableHDU.from_columns(
      [fits.Column(name=case(c), format=f, array=np.asarray(a)) for c, f, a in cols
       if c not in drop], name="COADD" if named else None)
  spall = fits.BinTableHDU.from_columns(
      [fits.Column(name="PLATE", format="J", array=[266]),
       fits.Column(name="MJD", format="J", array=[51630]),
       fits.Column(name="FIBERID", format="J", array=[1]),
       fits.Column(name="SPECOBJID", format="20A", array=[SID]),
       fits.Column(name="Z", format="E", array=[z]),
       fits.Column(name="Z_ERR", format="E", array=[1e-5]),
       fits.Column(name="CLASS", format="6A", array=["GALAXY"])],
      name="SPALL" if named else None)
  fits.HDUList([fits.PrimaryHDU(), coadd, spall]).writeto(path, overwrite=True)
  return str(path)


def make_galaxy(raw, sid=SID, bands=grid.PS1_BANDS, shape=(12, 10), spectrum="csv"):
  """RAW/Galaxy_{sid} with band b's image = b's index + noise; returns the folder."""
  gdir = os.path.join(raw, f"Galaxy_{sid}")
  rng = np.random.default_rng(0)
  for k, band in enumerate(bands):
    write_image(os.path.join(gdir, "images", f"{sid}_{band}.fits"),
                k + 0.01 * rng.normal(size=shape), band)
  wl = 10 ** (3.5797 + 1e-4 * np.arange(50))
  if spectrum == "csv":
    write_csv_spectrum(os.path.join(gdir, "spectrum", "spectrum.csv"), wl, np.ones(50))
  elif spectrum == "fits":
    write_lite_spec(os.path.join(gdir, "spectrum", "spec-0266-51630-0001.fits"),
                    np.log10(wl), np.ones(50))
  return gdir


def assert_input_error(excinfo, path, reason):
  err = excinfo.value
  assert isinstance(err, fits_io.InputError) and isinstance(err, ValueError)
  assert err.path == str(path)
  assert err.reason == reason
  assert str(err).startswith(f"{path}: {reason}")


# --------------------------------------------------------------------------- InputError


def test_input_error_message_and_pickle():
  err = fits_io.InputError("/a/b.fits", fits_io.MISSING_BAND)
  assert str(err) == "/a/b.fits: missing band file"
  err = fits_io.InputError("/a/data.csv", fits_io.BAD_ROW, detail="line 3: x", line=3)
  assert str(err) == "/a/data.csv: bad data.csv row (line 3: x)"
  back = pickle.loads(pickle.dumps(err))
  assert (back.path, back.reason, back.detail, back.line) == ("/a/data.csv", fits_io.BAD_ROW,
                                                              "line 3: x", 3)
  assert len(set(fits_io.REASONS)) == len(fits_io.REASONS)


# --------------------------------------------------------------------------- data.csv


def test_read_catalog_quoted_and_unquoted(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text(
      "#plate,mjd,fiberid,specobj_id,ra,dec,z\n"
      "266,51630,1,'299489677444933632',146.71421,-1.0413043,0.02127545\n"
      "'267','51608','12','300618176569311232',148.0,0.5,\n"
      "\n"
      "268,51633,3,300901926498195456,150.25,1.25,0.5\n")
  rows = fits_io.read_catalog(path)
  assert rows[0] == fits_io.CatalogRow(266, 51630, 1, SID, 146.71421, -1.0413043, 0.02127545)
  assert rows[0].has_z
  assert (rows[1].plate, rows[1].mjd, rows[1].fiberid) == (267, 51608, 12)
  assert rows[1].specobj_id == "300618176569311232"
  assert math.isnan(rows[1].z) and not rows[1].has_z
  assert rows[2].specobj_id == "300901926498195456" and rows[2].z == 0.5
  assert len(rows) == 3


def test_fiber_diameter_follows_the_spectrograph_of_the_mjd():
  # SDSS-II's last plates (July 2008) through 3 arcsec fibers; BOSS (from December 2009) 2.
  sdss = fits_io.CatalogRow(2974, 54592, 10, SID, 0.0, 0.0)
  boss = fits_io.CatalogRow(3586, 55181, 10, SID, 0.0, 0.0)
  assert (sdss.fiber_diameter, boss.fiber_diameter) == (3.0, 2.0)
  assert fits_io.fiber_diameter_arcsec(fits_io.BOSS_FIRST_MJD - 1) == 3.0
  assert fits_io.fiber_diameter_arcsec(fits_io.BOSS_FIRST_MJD) == 2.0


def test_read_catalog_without_z_column(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("#plate,mjd,fiberid,specobj_id,ra,dec\n266,51630,1,'1234',10.0,20.0\n")
  (row,) = fits_io.read_catalog(path)
  assert row.specobj_id == "1234" and (row.ra, row.dec) == (10.0, 20.0)
  assert math.isnan(row.z) and not row.has_z


@pytest.mark.parametrize("bad", ["266,51630,1,'12',abc,1.0,0.1",      # non-numeric ra
                                 "266,51630,1,'12',10.0,1.0",         # missing field
                                 "266,51630,1,'12x',10.0,1.0,0.1",    # id not an integer
                                 "266.5,51630,1,'12',10.0,1.0,0.1",   # non-integer plate
                                 "266,51630,1,'12',10.0,95.0,0.1"])   # dec out of range
def test_read_catalog_bad_row(tmp_path, bad):
  path = tmp_path / "data.csv"
  path.write_text("#plate,mjd,fiberid,specobj_id,ra,dec,z\n"
                  "266,51630,1,'11',10.0,1.0,0.1\n" + bad + "\n"
                  "266,51630,1,'13',10.0,1.0,0.1\n")
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_catalog(path)
  assert_input_error(excinfo, path, fits_io.BAD_ROW)
  assert excinfo.value.line == 3 and "line 3" in str(excinfo.value)
  rows = fits_io.read_catalog_rows(path)
  assert [r.specobj_id for r in (rows[0], rows[2])] == ["11", "13"]
  assert isinstance(rows[1], fits_io.InputError) and rows[1].line == 3


def test_read_catalog_missing_columns_and_file(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("#plate,mjd,fiberid,specobj_id,dec,z\n266,51630,1,'11',1.0,0.1\n")
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_catalog_rows(path)
  assert_input_error(excinfo, path, fits_io.MISSING_COLUMNS)
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_catalog(tmp_path / "nope.csv")
  assert_input_error(excinfo, tmp_path / "nope.csv", fits_io.MISSING_FILE)


# --------------------------------------------------------------------------- images


def test_fits_round_trip(tmp_path):
  data = np.random.default_rng(1).normal(size=(12, 10)).astype(np.float32)
  path = write_image(tmp_path / "x_g.fits", data, "g")
  image, header = fits_io.read_image(path)
  assert image.dtype == np.float32 and image.flags.writeable
  np.testing.assert_array_equal(image, data)
  assert header["EXPTIME"] == 100.0 and header["MAGZERO"] == pytest.approx(30.0)
  assert header["BUNIT"] == "DN" and header["FILTER"] == "g.00000"
  assert (header["NAXIS1"], header["NAXIS2"]) == (10, 12)
  assert preprocess.zero_point(header) == pytest.approx(30.0)


def test_read_image_scaled_integers_and_blank(tmp_path):
  raw = np.arange(12, dtype=np.int16).reshape(3, 4)
  hdu = fits.PrimaryHDU(raw)
  hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 10.0, 5
  hdu.writeto(tmp_path / "i.fits")
  image, _ = fits_io.read_image(tmp_path / "i.fits")
  expected = raw * 0.5 + 10.0
  expected[1, 1] = np.nan  # raw value 5 is BLANK
  np.testing.assert_array_equal(image, expected.astype(np.float32))


def test_read_image_in_extension_or_compressed(tmp_path):
  data = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, _header())]).writeto(tmp_path / "e.fits")
  fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, _header(), compression_type="GZIP_2",
                                                     quantize_level=0.0)]).writeto(
                                                         tmp_path / "c.fits")
  for name in ("e.fits", "c.fits"):
    image, header = fits_io.read_image(tmp_path / name)
    np.testing.assert_array_equal(image, data)
    assert header["EXPTIME"] == 100.0


def test_read_image_missing_garbage_truncated(tmp_path):
  path = tmp_path / "missing_g.fits"
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_image(path)
  assert_input_error(excinfo, path, fits_io.MISSING_BAND)

  garbage = tmp_path / "garbage.fits"
  garbage.write_bytes(b"this is not a FITS file\n" * 200)
  empty = tmp_path / "empty.fits"
  empty.write_bytes(b"")
  good = write_image(tmp_path / "good.fits", np.ones((12, 10)))
  raw = open(good, "rb").read()
  cut_data = tmp_path / "cut_data.fits"
  cut_data.write_bytes(raw[:2880 + 100])  # Header complete, data cut short.
  cut_header = tmp_path / "cut_header.fits"
  cut_header.write_bytes(raw[:1000])  # Header cut before END.
  for path in (garbage, empty, cut_data, cut_header):
    with pytest.raises(fits_io.InputError) as excinfo:
      fits_io.read_image(path)
    assert_input_error(excinfo, path, fits_io.UNREADABLE_FITS)


def test_read_image_no_2d_image(tmp_path):
  table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=[1.0])])
  fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "table.fits")
  fits.PrimaryHDU(np.ones(7, np.float32)).writeto(tmp_path / "1d.fits")
  for name in ("table.fits", "1d.fits"):
    with pytest.raises(fits_io.InputError) as excinfo:
      fits_io.read_image(tmp_path / name)
    assert_input_error(excinfo, tmp_path / name, fits_io.NO_IMAGE)


def test_read_images_band_order_and_shape(tmp_path):
  gdir = make_galaxy(str(tmp_path))
  images, headers = fits_io.read_images(gdir, SID)
  assert images.shape == (5, 12, 10) and images.dtype == np.float32
  np.testing.assert_allclose(images.mean(axis=(1, 2)), np.arange(5), atol=0.01)
  assert [h["FILTER"][0] for h in headers] == list(grid.PS1_BANDS)
  images, headers = fits_io.read_images(gdir, SID, bands=("z", "g"), shape=(12, 10))
  np.testing.assert_allclose(images.mean(axis=(1, 2)), [3, 0], atol=0.01)
  assert [h["FILTER"][0] for h in headers] == ["z", "g"]


def test_read_images_mixed_layouts(tmp_path):
  gdir = make_galaxy(str(tmp_path))
  plain, _ = fits_io.read_images(gdir, SID)
  r_path = os.path.join(gdir, "images", f"{SID}_r.fits")
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(plain[1], _header("r"))]).writeto(
      r_path, overwrite=True)
  mixed, headers = fits_io.read_images(gdir, SID)
  np.testing.assert_array_equal(mixed, plain)
  assert headers[1]["FILTER"] == "r.00000"


def test_read_images_errors(tmp_path):
  gdir = make_galaxy(str(tmp_path))
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_images(gdir, SID, shape=(288, 288))
  assert_input_error(excinfo, os.path.join(gdir, "images", f"{SID}_g.fits"), fits_io.WRONG_SHAPE)

  i_path = os.path.join(gdir, "images", f"{SID}_i.fits")
  write_image(i_path, np.zeros((12, 12)), "i")
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_images(gdir, SID)
  assert_input_error(excinfo, i_path, fits_io.INCONSISTENT_SHAPES)

  os.remove(i_path)
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_images(gdir, SID)
  assert_input_error(excinfo, i_path, fits_io.MISSING_BAND)


def test_image_ra_dec(tmp_path):
  path = write_image(tmp_path / "w.fits", np.zeros((13, 11)))
  _, header = fits_io.read_image(path)
  ra, dec = fits_io.image_ra_dec(header)
  assert ra == pytest.approx(146.71421, abs=1e-9) and dec == pytest.approx(-1.0413043, abs=1e-9)
  # A plain dict of cards works as well; an even-sized image's centre is between pixels.
  cards = dict(_header(ra=10.0, dec=20.0, shape=(4, 4)))
  ra, dec = fits_io.image_ra_dec(cards, shape=(4, 4))
  assert ra == pytest.approx(10.0, abs=1e-9) and dec == pytest.approx(20.0, abs=1e-9)


# --------------------------------------------------------------------------- spectra: CSV


def test_read_spectrum_csv(tmp_path):
  wl = np.array([3800.5, 3801.25, 3802.0])
  path = write_csv_spectrum(tmp_path / "spectrum.csv", wl, [1.5, float("nan"), -2.25])
  spec = fits_io.read_spectrum_csv(path)
  assert spec.wavelength.dtype == np.float64 and spec.flux.dtype == np.float32
  np.testing.assert_array_equal(spec.wavelength, wl)
  np.testing.assert_array_equal(spec.flux, np.float32([1.5, np.nan, -2.25]))
  assert spec.ivar is None and spec.and_mask is None and math.isnan(spec.z)
  assert spec.path == path


@pytest.mark.parametrize("body, reason", [
    ("wavelength,flux\n", fits_io.EMPTY_SPECTRUM),
    ("", fits_io.EMPTY_SPECTRUM),
    ("wavelength,flux\n4000,1\n4001,abc\n", fits_io.NON_NUMERIC_SPECTRUM),
    ("wavelength,flux\n4000,1\n4001,\n", fits_io.NON_NUMERIC_SPECTRUM),
    ("wavelength,flux\n4000,1\n4001,2,3\n", fits_io.NON_NUMERIC_SPECTRUM),
    ("wavelength,flux\n4000,1\n4002,1\n4001,1\n", fits_io.NON_MONOTONIC),
    ("wavelength,flux\n4000,1\n4001,1\n4001,1\n", fits_io.DUPLICATED_WAVELENGTH),
    ("wavelength,flux\n4000,1\nnan,1\n", fits_io.NON_FINITE_WAVELENGTH),
    ("wave,flux\n4000,1\n", fits_io.MISSING_COLUMNS),
    ("wavelength,flux,sky\n4000,1,2\n", fits_io.UNKNOWN_COLUMNS),
])
def test_read_spectrum_csv_errors(tmp_path, body, reason):
  path = tmp_path / "spectrum.csv"
  path.write_text(body)
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_spectrum_csv(path)
  assert_input_error(excinfo, path, reason)


def test_read_csvs_with_crlf_and_bom(tmp_path):
  spec_path = tmp_path / "spectrum.csv"
  spec_path.write_bytes(b"\xef\xbb\xbfwavelength,flux\r\n4000.5,1.25\r\n4001.5,2.5\r\n")
  spec = fits_io.read_spectrum_csv(spec_path)
  np.testing.assert_array_equal(spec.wavelength, [4000.5, 4001.5])
  np.testing.assert_array_equal(spec.flux, [1.25, 2.5])
  cat_path = tmp_path / "data.csv"
  cat_path.write_bytes(b"\xef\xbb\xbf#plate,mjd,fiberid,specobj_id,ra,dec,z\r\n"
                       b"266,51630,1,'12',10.5,-1.5,0.25\r\n")
  assert fits_io.read_catalog(cat_path) == [fits_io.CatalogRow(266, 51630, 1, "12", 10.5, -1.5,
                                                               0.25)]


def test_read_spectrum_csv_missing(tmp_path):
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_spectrum_csv(tmp_path / "spectrum.csv")
  assert_input_error(excinfo, tmp_path / "spectrum.csv", fits_io.MISSING_SPECTRUM)


# --------------------------------------------------------------------------- spectra: SDSS lite


@pytest.mark.parametrize("upper, named", [(False, True), (True, False)])
def test_read_sdss_spec(tmp_path, upper, named):
  loglam = (3.5797 + 1e-4 * np.arange(100)).astype(np.float32)  # float32 like real lite files
  flux = np.linspace(1.0, 2.0, 100)
  ivar = np.full(100, 4.0)
  and_mask = np.zeros(100, np.int32)
  and_mask[10] = 1 << 23
  path = write_lite_spec(tmp_path / "spec-0266-51630-0001.fits", loglam, flux, ivar, and_mask,
                         z=0.0213, upper=upper, named=named)
  spec = fits_io.read_sdss_spec(path)
  np.testing.assert_allclose(spec.wavelength, 10 ** loglam.astype(np.float64), rtol=1e-15)
  np.testing.assert_array_equal(spec.flux, flux.astype(np.float32))
  np.testing.assert_array_equal(spec.ivar, ivar.astype(np.float32))
  np.testing.assert_array_equal(spec.and_mask, and_mask)
  assert spec.z == pytest.approx(0.0213, rel=1e-6)
  # On the grid: pixel 10 (loglam 3.5807 = grid pixel 7) is masked, the rest carry ivar.
  flux_g, weight = preprocess.resample_to_grid(spec.wavelength, spec.flux, spec.ivar,
                                               spec.and_mask)
  assert weight[7] == 0 and flux_g[7] == 0
  np.testing.assert_array_equal(weight[:97][np.arange(97) != 7], 4.0)
  np.testing.assert_array_equal(flux_g[:97], np.where(np.arange(97) == 7, 0, spec.flux[3:]))
  assert preprocess.count_valid(weight) == 96


def test_read_sdss_spec_errors(tmp_path):
  loglam = 3.5797 + 1e-4 * np.arange(10)
  path = write_lite_spec(tmp_path / "spec-a.fits", loglam, np.ones(10), drop=("loglam",))
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(path)
  assert_input_error(excinfo, path, fits_io.MISSING_COLUMNS)

  path = write_lite_spec(tmp_path / "spec-b.fits", loglam[::-1], np.ones(10))
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(path)
  assert_input_error(excinfo, path, fits_io.NON_MONOTONIC)

  garbage = tmp_path / "spec-c.fits"
  garbage.write_bytes(b"\x00garbage" * 500)
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(garbage)
  assert_input_error(excinfo, garbage, fits_io.UNREADABLE_FITS)

  path = write_lite_spec(tmp_path / "spec-d.fits", loglam[:0], np.ones(0))
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(path)
  assert_input_error(excinfo, path, fits_io.EMPTY_SPECTRUM)

  good = write_lite_spec(tmp_path / "spec-e.fits", 3.58 + 1e-4 * np.arange(500), np.ones(500))
  truncated = tmp_path / "spec-f.fits"
  truncated.write_bytes(open(good, "rb").read()[:2880 * 3 + 1000])  # inside the COADD data
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(truncated)
  assert_input_error(excinfo, truncated, fits_io.UNREADABLE_FITS)

  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_sdss_spec(tmp_path / "spec-none.fits")
  assert_input_error(excinfo, tmp_path / "spec-none.fits", fits_io.MISSING_SPECTRUM)


# --------------------------------------------------------------------------- galaxies


def test_find_spectrum_prefers_fits(tmp_path):
  gdir = make_galaxy(str(tmp_path), spectrum="csv")
  assert fits_io.find_spectrum(gdir) == os.path.join(gdir, "spectrum", "spectrum.csv")
  top = write_lite_spec(os.path.join(gdir, "spec-0266-51630-0001.fits"), [3.6, 3.7], [1, 1])
  assert fits_io.find_spectrum(gdir) == top
  inner = write_lite_spec(os.path.join(gdir, "spectrum", "spec-0266-51630-0001.fits"),
                          [3.6, 3.7], [1, 1])
  assert fits_io.find_spectrum(gdir) == inner
  assert fits_io.find_spectrum(make_galaxy(str(tmp_path), sid="7", spectrum=None)) is None


@pytest.mark.parametrize("kind", ["csv", "fits"])
def test_read_galaxy(tmp_path, kind):
  gdir = make_galaxy(str(tmp_path), spectrum=kind)
  galaxy = fits_io.read_galaxy(gdir)
  assert galaxy.specobj_id == SID and galaxy.bands == grid.PS1_BANDS
  assert galaxy.images.shape == (5, 12, 10) and len(galaxy.headers) == 5
  assert galaxy.spectrum.flux.shape == (50,) and galaxy.row is None and galaxy.path == gdir
  assert (galaxy.spectrum.ivar is None) == (kind == "csv")
  row = fits_io.CatalogRow(266, 51630, 1, SID, 1.0, 2.0)
  galaxy = fits_io.read_galaxy(gdir, bands=("r",), row=row, image_shape=(12, 10))
  assert galaxy.row is row and galaxy.images.shape == (1, 12, 10)


def test_read_galaxy_missing_spectrum(tmp_path):
  gdir = make_galaxy(str(tmp_path), spectrum=None)
  with pytest.raises(fits_io.InputError) as excinfo:
    fits_io.read_galaxy(gdir)
  assert_input_error(excinfo, os.path.join(gdir, "spectrum", "spectrum.csv"),
                     fits_io.MISSING_SPECTRUM)
  assert fits_io.read_galaxy(gdir, require_spectrum=False).spectrum is None


def test_the_same_files_at_a_url_read_the_same(tmp_path, ram_copy):
  # Every reader through epath on ram:// (as on gs://): the same arrays, and the same reasons
  # and details naming the file under the URL, as from the local copy. (No name here is the
  # start of another's in its folder: ram:// takes such a name for a folder.)
  gdir = make_galaxy(str(tmp_path / "raw"), spectrum="fits")
  write_csv_spectrum(os.path.join(gdir, "spectrum", "spectrum.csv"), [4000.0, 4001.0], [1, 2])
  images = os.path.join(gdir, "images")
  raw = open(os.path.join(images, f"{SID}_g.fits"), "rb").read()
  with gzip.open(os.path.join(images, f"{SID}_r.fits.gz"), "wb") as f:
    f.write(open(os.path.join(images, f"{SID}_r.fits"), "rb").read())
  os.remove(os.path.join(images, f"{SID}_r.fits"))
  for name, data in (("cut.fits", raw[:2880 + 100]), ("garbage.fits", b"not FITS\n" * 400),
                     ("cutgz.fits.gz", gzip.compress(raw)[:300])):
    open(os.path.join(images, name), "wb").write(data)
  with open(tmp_path / "raw" / "data.csv", "w") as f:
    f.write("\ufeff#plate,mjd,fiberid,specobj_id,ra,dec,z\n"
            f"266,51630,1,'{SID}',146.7,-1.04,0.1\n266,51630,x,'7',1,2,0.2\n")
  url = ram_copy(tmp_path / "raw", "raw")
  remote = lambda path: url + path[len(str(tmp_path / "raw")):]

  def outcome(read, path):
    try:
      return read(path)
    except fits_io.InputError as e:
      return (e.path, e.reason, e.detail)

  galaxy, at_url = fits_io.read_galaxy(gdir), fits_io.read_galaxy(remote(gdir))
  np.testing.assert_array_equal(at_url.images, galaxy.images)
  assert at_url.path == remote(gdir) and at_url.spectrum.path == remote(galaxy.spectrum.path)
  np.testing.assert_array_equal(at_url.spectrum.flux, galaxy.spectrum.flux)
  assert fits_io.find_spectrum(remote(gdir)).endswith("spectrum/spec-0266-51630-0001.fits")
  assert fits_io.band_path(remote(gdir), SID, "r").endswith(f"{SID}_r.fits.gz")
  csv = os.path.join(gdir, "spectrum", "spectrum.csv")
  np.testing.assert_array_equal(fits_io.read_spectrum(remote(csv)).flux,
                                fits_io.read_spectrum(csv).flux)
  catalog = str(tmp_path / "raw" / "data.csv")
  local_rows = fits_io.read_catalog_rows(catalog)
  url_rows = fits_io.read_catalog_rows(remote(catalog))
  assert url_rows[0] == local_rows[0] and url_rows[1].reason == fits_io.BAD_ROW
  assert str(url_rows[1]) == remote(str(local_rows[1]))
  for name in ("cut.fits", "garbage.fits", "cutgz.fits.gz", "missing.fits"):
    path = os.path.join(images, name)
    local, at_url = outcome(fits_io.read_image, path), outcome(fits_io.read_image, remote(path))
    assert at_url == (remote(path),) + local[1:] and local[1] in (
        fits_io.UNREADABLE_FITS, fits_io.MISSING_BAND), name
  missing = os.path.join(gdir, "spectrum", "spec-none.fits")
  assert outcome(fits_io.read_spectrum, remote(missing))[1:] == (fits_io.MISSING_SPECTRUM, None)
  assert outcome(fits_io.read_catalog_rows, remote(catalog + "x"))[1] == fits_io.MISSING_FILE
