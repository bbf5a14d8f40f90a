"""Tests of astra_jax.data.mock: file formats, determinism and the physics of the mock survey."""

import csv
import dataclasses
import glob
import hashlib
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from astropy import wcs
from astropy.io import fits

from astra_jax import grid
from astra_jax.data import fits_io
from astra_jax.data import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM, SEED = 6, 11


def _generate(path, seed=SEED, **kwargs):
  return mock.generate_survey(str(path), NUM, seed, sdss_spec=True, neighbours=False, **kwargs)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
  """(directory, ids, truth rows) of a 6-galaxy survey without neighbours, with lite specs."""
  out = tmp_path_factory.mktemp("mock") / "a"
  ids = _generate(out)
  with open(out / "truth.csv") as f:
    rows = list(csv.DictReader(f))
  return out, ids, rows


def _tree_hashes(root):
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _lite_path(out, row):
  return os.path.join(out, f"Galaxy_{row['specobj_id']}", "spectrum",
                      f"spec-{int(row['plate']):04d}-{int(row['mjd']):05d}-"
                      f"{int(row['fiberid']):04d}.fits")


# --------------------------------------------------------------------------- identifiers, layout


def test_specobj_id_bit_encoding():
  assert mock.specobj_id(266, 51630, 1) == 299489677444933632
  sid = mock.specobj_id(11000, 58000, 999)
  assert (sid >> 50, (sid >> 38) & 0xFFF, ((sid >> 24) & 0x3FFF) + 50000, (sid >> 10) & 0x3FFF) \
      == (11000, 999, 58000, 26)


def test_data_csv_matches_encoding_and_folders(survey):
  out, ids, rows = survey
  with open(out / "data.csv") as f:
    lines = f.read().splitlines()
  assert lines[0] == "#plate,mjd,fiberid,specobj_id,ra,dec,z"
  assert len(lines) == NUM + 1
  pattern = re.compile(r"^(\d+),(\d+),(\d+),'(\d+)',(-?[\d.]+),(-?[\d.]+),([\d.]+)$")
  seen = set()
  for line, sid, row in zip(lines[1:], ids, rows):
    m = pattern.match(line)
    assert m, line
    plate, mjd, fiber = (int(m.group(i)) for i in (1, 2, 3))
    assert m.group(4) == sid == row["specobj_id"] == str(mock.specobj_id(plate, mjd, fiber))
    assert (plate, mjd, fiber) not in seen
    seen.add((plate, mjd, fiber))
    survey_name = row["survey"]
    lo, hi = mock._PLATES[survey_name]
    assert lo <= plate <= hi and mock._MJDS[survey_name][0] <= mjd <= mock._MJDS[survey_name][1]
    assert 1 <= fiber <= mock._FIBERS[survey_name]
    assert float(m.group(7)) == float(row["z"])
    for band in grid.PS1_BANDS:
      assert os.path.isfile(out / f"Galaxy_{sid}" / "images" / f"{sid}_{band}.fits")
    assert os.path.isfile(out / f"Galaxy_{sid}" / "spectrum" / "spectrum.csv")
  parsed = fits_io.read_catalog(out / "data.csv")  # The project's own reader accepts it.
  assert [r.specobj_id for r in parsed] == ids


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_any_workers_other_seed_differs(survey, tmp_path):
  out, _, _ = survey
  reference = _tree_hashes(out)
  assert len(reference) == NUM * 7 + 2  # 5 images, csv, lite spec per galaxy; data, truth.
  _generate(tmp_path / "b", num_workers=2)
  assert _tree_hashes(tmp_path / "b") == reference
  _generate(tmp_path / "c", seed=SEED + 1)
  other = _tree_hashes(tmp_path / "c")
  assert other["data.csv"] != reference["data.csv"]
  assert not set(other.values()) & set(reference.values())


# --------------------------------------------------------------------------- images


def test_image_flux_equals_filter_integrated_sed(survey):
  """Pixel sum, corrected for the light off the stamp, = 10^(-0.4 (mag - MAGZERO)) +- noise."""
  out, _, rows = survey
  for row in rows:
    sid = row["specobj_id"]
    for band in grid.PS1_BANDS:
      image, header = fits_io.read_image(out / f"Galaxy_{sid}" / "images" / f"{sid}_{band}.fits")
      expected = 10 ** (-0.4 * (float(row[f"mag_{band}_ab"]) - header["MAGZERO"]))
      assert expected == pytest.approx(float(row[f"flux_{band}_count"]), rel=1e-6)
      outside = float(row[f"outside_stamp_frac_{band}"])
      total = image.astype(np.float64).sum() / (1 - outside)
      sigma = np.sqrt(image.size * header["SKYSIG"] ** 2 + expected) / (1 - outside)
      assert abs(total - expected) < 4 * sigma, (sid, band, total, expected, sigma)
      assert sigma < 0.2 * expected  # The check above has teeth.


def test_noiseless_survey_images_hold_exactly_the_sed_flux(tmp_path):
  """Image magnitudes (pixel sum corrected for the light off the stamp, MAGZERO) = speclite's
  magnitudes of the model SED rebuilt from the truth's z and template weights."""
  import speclite.filters  # pylint: disable=g-import-not-at-top
  bands = speclite.filters.load_filters(*[f"panstarrs-{b}" for b in grid.PS1_BANDS])
  wave = np.arange(3500.0, 11500.0, 0.25)
  ids = mock.generate_survey(tmp_path, 3, SEED, noise=False, neighbours=False)
  with open(tmp_path / "truth.csv") as f:
    rows = list(csv.DictReader(f))
  for sid, row in zip(ids, rows):
    weights = [float(row[f"bulge_template{k}_msun"]) + float(row[f"disk_template{k}_msun"])
               for k in range(mock.NUM_TEMPLATES)]
    sed = mock.observed_sed(wave, float(row["z"]), weights) * 1e-17
    table = bands.get_ab_magnitudes(sed, wave)
    images, headers = fits_io.read_images(tmp_path / f"Galaxy_{sid}", sid)
    for band, image, header in zip(grid.PS1_BANDS, images, headers):
      total = image.astype(np.float64).sum() / (1 - float(row[f"outside_stamp_frac_{band}"]))
      mag = header["MAGZERO"] - 2.5 * np.log10(total)
      assert mag == pytest.approx(float(row[f"mag_{band}_ab"]), abs=3e-4), (sid, band)
      assert mag == pytest.approx(table[f"panstarrs-{band}"][0], abs=3e-3), (sid, band)


def test_noiseless_render_conserves_flux_and_is_centred():
  rng = np.random.default_rng(3)
  gal = mock.sample_galaxy(rng)
  cond = mock.sample_conditions(rng, "SDSS")
  rendered = mock.render_images(gal, cond)
  counts = gal.component_maggies().sum(axis=0) * 10 ** (0.4 * cond.magzero)
  np.testing.assert_allclose(rendered.flux, counts, rtol=1e-9)
  sums = rendered.model.astype(np.float64).sum(axis=(1, 2))
  np.testing.assert_allclose(sums / (1 - rendered.outside_frac), counts, rtol=2e-4)
  assert np.all(rendered.outside_frac > -1e-4) and np.all(rendered.outside_frac < 0.3)
  yy, xx = np.mgrid[:mock.STAMP, :mock.STAMP]
  for img in rendered.model:
    centre = (np.sum(img * xx) / img.sum(), np.sum(img * yy) / img.sum())
    np.testing.assert_allclose(centre, mock.CENTRE, atol=0.05)
  # Neighbours add their own flux, away from the galaxy (and its fiber).
  with_nb = mock.render_images(gal, cond, neighbour_rng=np.random.default_rng(7))
  assert with_nb.neighbours
  extra = (with_nb.images - with_nb.model).astype(np.float64)
  nb_counts = sum(nb["maggies"] for nb in with_nb.neighbours) * 10 ** (0.4 * cond.magzero)
  assert np.all(extra.sum(axis=(1, 2)) > 0.3 * nb_counts)
  assert np.all(extra.sum(axis=(1, 2)) < nb_counts * (1 + 1e-3))
  centre = slice(136, 152)
  assert np.abs(extra[:, centre, centre]).max() < 1e-3 * rendered.model[:, centre, centre].max()
  # A bigger disk puts less of its light in the fiber.
  big = dataclasses.replace(gal, disk_re_kpc=3 * gal.disk_re_kpc)
  assert mock.render_images(big, cond).fiber_frac[1] < rendered.fiber_frac[1]


def test_headers_units_and_wcs(survey):
  out, _, rows = survey
  for row in rows[:3]:
    sid = row["specobj_id"]
    for k, band in enumerate(grid.PS1_BANDS):
      path = out / f"Galaxy_{sid}" / "images" / f"{sid}_{band}.fits"
      with warnings.catch_warnings():
        warnings.simplefilter("error")  # Any non-standard card would warn.
        with fits.open(path) as hdul:
          hdul.verify("exception")
          header, data = hdul[0].header, hdul[0].data
      assert data.shape == (288, 288) and data.dtype == np.dtype(">f4")
      assert header["BUNIT"] == "count" and "MAGZERO" in header.comments["BUNIT"]
      assert header["FILTER"] == band and header["HIERARCH FPA.FILTER"].startswith(band)
      assert header["HIERARCH FPA.ZP"] == 25.0
      assert header["EXPTIME"] == header["HIERARCH FPA.EXPOSURE"] > 100
      assert header["MAGZERO"] == pytest.approx(25 + 2.5 * np.log10(header["EXPTIME"]), abs=1e-5)
      assert 0.85 <= header["PSF_FWHM"] <= 1.6
      assert header["PSF_FWHM"] == pytest.approx(float(row[f"psf_fwhm_{band}_arcsec"]), abs=1e-4)
      assert 20.5 < header["MAGLIM5"] < 24.0
      w = wcs.WCS(header)
      centre = w.pixel_to_world(mock.CENTRE, mock.CENTRE)
      assert abs(centre.ra.deg - float(row["ra_deg"])) * np.cos(np.deg2rad(centre.dec.deg)) \
          * 3600 < 0.1
      assert abs(centre.dec.deg - float(row["dec_deg"])) * 3600 < 0.1
      east = w.pixel_to_world(mock.CENTRE - 40, mock.CENTRE)  # 10 arcsec to the left.
      north = w.pixel_to_world(mock.CENTRE, mock.CENTRE + 40)
      assert east.separation(centre).arcsec == pytest.approx(10.0, rel=1e-3)
      assert centre.position_angle(east).deg == pytest.approx(90.0, abs=0.01)
      assert north.dec.deg > centre.dec.deg


# --------------------------------------------------------------------------- SED, photometry


def test_colour_reddens_with_redshift_for_fixed_mixture():
  rng = np.random.default_rng(0)
  bulge = mock.sample_galaxy(rng).bulge_weights  # An old, red mixture.
  zs = np.arange(0.01, 0.45, 0.05)
  g_r = np.array([np.subtract(*mock.ab_magnitudes(z, bulge)[:2]) for z in zs])
  assert np.all(np.diff(g_r) > 0.02), g_r
  assert g_r[-1] - g_r[0] > 0.6  # The 4000 A break moves from g into r.


def test_band_magnitudes_agree_with_speclite_on_the_sed():
  import speclite.filters  # pylint: disable=g-import-not-at-top
  bands = speclite.filters.load_filters(*[f"panstarrs-{b}" for b in grid.PS1_BANDS])
  weights = np.array([0.1, 0.05, 1.0, 0.3, 0.4]) * 1e10
  wave = np.arange(3500.0, 11500.0, 0.25)
  for z in (0.05, 0.2):
    sed = mock.observed_sed(wave, z, weights) * 1e-17
    table = bands.get_ab_magnitudes(sed, wave)
    np.testing.assert_allclose([table[c][0] for c in table.colnames],
                               mock.ab_magnitudes(z, weights), atol=2e-3)


def test_population_is_main_sample_like():
  rng = np.random.default_rng(1)
  gals = [mock.sample_galaxy(rng) for _ in range(150)]
  z = np.array([g.z for g in gals])
  r = np.array([g.r_mag() for g in gals])
  assert np.all((z >= mock.Z_MIN) & (z <= mock.Z_MAX))
  assert np.all(r < 17.77) and 0.07 < np.median(z) < 0.13
  assert np.all([g.bulge_re_kpc <= g.disk_re_kpc for g in gals])
  colours = np.array([-2.5 * np.log10(g.component_maggies()[:, 0] / g.component_maggies()[:, 1])
                      for g in gals])  # (galaxies, [bulge, disk]) observed g - r
  assert np.median(colours[:, 0] - colours[:, 1]) > 0.1  # Bulges are redder.


# --------------------------------------------------------------------------- spectra


def _read_spectrum_csv(path):
  with open(path) as f:
    assert f.readline() == "wavelength,flux\n"
  return np.loadtxt(path, delimiter=",", skiprows=1).T


def test_spectrum_csv_lattice_range_and_snr(survey):
  out, _, rows = survey
  for row in rows:
    wave, flux = _read_spectrum_csv(out / f"Galaxy_{row['specobj_id']}" / "spectrum" /
                                    "spectrum.csv")
    index = (np.log10(wave) - grid.LOGLAM0) / grid.DLOGLAM
    np.testing.assert_allclose(index, np.round(index), atol=2e-3)
    assert np.all(np.diff(np.round(index)) == 1)
    if row["survey"] == "SDSS":
      assert 3790 < wave[0] < 3820 and 9150 < wave[-1] < 9260
    else:
      assert 3550 < wave[0] < 3610 and 10300 < wave[-1] < 10450
    assert wave.size == int(row["spec_npix"]) and np.all(np.isfinite(flux))
    assert 2 < float(row["spec_snr_median"]) < 80


def _peak_offset(wave, flux, expected, half_width=6):
  """Offset [lattice pixels] of the flux peak near `expected` [A], refined by a parabola."""
  near = np.flatnonzero(np.abs(np.log10(wave / expected)) < half_width * grid.DLOGLAM)
  p = near[np.argmax(flux[near])]
  y0, y1, y2 = flux[p - 1:p + 2]
  return np.log10(wave[p] / expected) / grid.DLOGLAM + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2), p


def test_emission_lines_at_redshifted_vacuum_wavelengths():
  """Noiseless star-forming spectrum: Halpha, [OIII] 5008, [OII] 3730 peak at (1+z) lambda_vac
  (air wavelengths would be 1.2 pixels off)."""
  rng = np.random.default_rng(5)
  gal = dataclasses.replace(mock.sample_galaxy(rng), z=0.1234,
                            disk_weights=np.array([0.0, 2e7, 1e9, 1e9, 1e9]))
  cond = mock.sample_conditions(rng, "BOSS")
  spec = mock.simulate_spectrum(gal, cond, (0.3, 0.3))
  wave, flux = spec.wavelength, spec.flux.astype(np.float64)
  for vacuum, tolerance in ((6564.61, 0.2), (5008.24, 0.2), (3729.875, 0.5)):
    expected = (1 + gal.z) * vacuum
    offset, peak = _peak_offset(wave, flux, expected)
    assert abs(offset) < tolerance, (vacuum, offset)  # [OII] 3727 pulls the blend's peak.
    assert flux[peak] > 2 * np.median(flux[peak - 40:peak - 10]), vacuum  # Not a bump.


def test_strong_halpha_in_survey_file_at_its_redshift(survey):
  out, _, rows = survey
  row = max(rows, key=lambda r: float(r["fiber_line_Halpha_6565_1e-17_erg_s_cm2"]))
  assert float(row["fiber_line_Halpha_6565_1e-17_erg_s_cm2"]) > 100  # Seed has one.
  wave, flux = _read_spectrum_csv(out / f"Galaxy_{row['specobj_id']}" / "spectrum" /
                                  "spectrum.csv")
  offset, _ = _peak_offset(wave, flux, (1 + float(row["z"])) * 6564.61, half_width=4)
  assert abs(offset) < 0.5


def test_lite_spec_matches_csv_catalog_and_fiber_photometry(survey):
  import speclite.filters  # pylint: disable=g-import-not-at-top
  r_band = speclite.filters.load_filters("panstarrs-r")
  out, _, rows = survey
  for row in rows:
    with fits.open(_lite_path(out, row)) as hdul:
      assert [h.name for h in hdul][:3] == ["PRIMARY", "COADD", "SPALL"]
      head, coadd, spall = hdul[0].header, hdul["COADD"], hdul["SPALL"].data
      assert (head["PLATEID"], head["MJD"], head["FIBERID"]) == (
          int(row["plate"]), int(row["mjd"]), int(row["fiberid"]))
      assert head["PLUG_RA"] == float(row["ra_deg"]) and "erg" in head["BUNIT"]
      names = coadd.columns.names
      for col in ("flux", "loglam", "ivar", "and_mask", "or_mask", "wdisp", "sky", "model"):
        assert col in names
      units = {c.name: c.unit for c in coadd.columns}
      assert "erg" in units["flux"] and "Angstrom" in units["loglam"] and "erg" in units["ivar"]
      data = coadd.data
      assert data["flux"].dtype == np.dtype(">f4") and data["and_mask"].dtype == np.dtype(">i4")
      bad = data["ivar"] == 0
      assert 3 <= bad.sum() <= 12 and np.all(data["and_mask"][bad] & mock.FULLREJECT)
      assert spall["SPECOBJID"][0] == row["specobj_id"] and spall["CLASS"][0] == "GALAXY"
      assert (spall["PLATE"][0], spall["MJD"][0], spall["FIBERID"][0]) == (
          int(row["plate"]), int(row["mjd"]), int(row["fiberid"]))
      assert spall["Z"][0] == pytest.approx(float(row["z"]), rel=1e-6)
      assert 0 < spall["Z_ERR"][0] < 1e-3
      assert spall["RA"][0] == float(row["ra_deg"]) and spall["DEC"][0] == float(row["dec_deg"])
      model = np.asarray(data["model"], np.float64)
      loglam = np.asarray(data["loglam"], np.float64)
      flux = np.asarray(data["flux"], np.float64)
    wave, csv_flux = _read_spectrum_csv(out / f"Galaxy_{row['specobj_id']}" / "spectrum" /
                                        "spectrum.csv")
    np.testing.assert_allclose(10 ** loglam, wave, rtol=2e-6)
    np.testing.assert_allclose(flux, csv_flux, rtol=1e-5, atol=1e-6 * np.abs(flux).max())
    # The fiber spectrum through the r filter gives the truth's fiber magnitude.
    r_fiber = r_band.get_ab_magnitudes(model * 1e-17, wave)["panstarrs-r"][0]
    assert r_fiber == pytest.approx(float(row["fibermag_r_ab"]), abs=0.01)
    spec = fits_io.read_sdss_spec(_lite_path(out, row))  # The project's own reader accepts it.
    assert spec.z == pytest.approx(float(row["z"]), rel=1e-6)


# --------------------------------------------------------------------------- CLI


def test_cli_runs(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "astra_jax.data.mock", "--out_dir", str(tmp_path / "cli"),
       "--num_galaxies", "3", "--seed", "2", "--num_workers", "1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "3 galaxies" in result.stdout
  rows = fits_io.read_catalog(tmp_path / "cli" / "data.csv")
  assert len(rows) == 3
  galaxy = fits_io.read_galaxy(fits_io.galaxy_path(tmp_path / "cli", rows[0].specobj_id),
                               row=rows[0])
  assert galaxy.images.shape == (5, 288, 288) and galaxy.spectrum.wavelength.size > 3800
