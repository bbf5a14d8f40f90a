"""Raw ASTROPIXEL folder -> tfds shards: every galaxy written or rejected with its reason."""

import csv
import json
import multiprocessing.pool
import os
import shutil
import subprocess
import sys
import time

from astropy.io import fits
import numpy as np
import pytest
import tensorflow_datasets as tfds

from astra_jax import grid
from astra_jax import photometry
from astra_jax.data import astropixel
from astra_jax.data import datasets
from astra_jax.data import examples
from astra_jax.data import fits_io
from astra_jax.data import mock
from astra_jax.data import prepare
from astra_jax.data import preprocess
from experiments.configs import baseline

NUM_GOOD = 16


def _copy_galaxy(raw, source_id, new_id, rows):
  """Copies Galaxy_{source_id} as Galaxy_{new_id} (files renamed) and appends its data.csv row."""
  src, dst = os.path.join(raw, f"Galaxy_{source_id}"), os.path.join(raw, f"Galaxy_{new_id}")
  shutil.copytree(src, dst)
  for band in grid.PS1_BANDS:
    os.rename(os.path.join(dst, "images", f"{source_id}_{band}.fits"),
              os.path.join(dst, "images", f"{new_id}_{band}.fits"))
  if rows is not None:
    rows.append(rows[0].replace(f"'{source_id}'", f"'{new_id}'"))
  return dst


def _rewrite_spectrum(galaxy_dir, edit):
  path = os.path.join(galaxy_dir, "spectrum", "spectrum.csv")
  lines = open(path).read().splitlines()
  open(path, "w").write("\n".join(edit(lines)) + "\n")


def _write_image(path, data, header=None):
  fits.PrimaryHDU(np.asarray(data, np.float32), header).writeto(path, overwrite=True)


# Each broken copy: (id, how it is broken, the reason prepare must give).
BROKEN = {
    "900001": "missing band file",
    "900002": "unreadable or truncated FITS",
    "900003": "unreadable or truncated FITS",          # Not FITS at all.
    "900004": "wrong image shape",
    "900005": "inconsistent image shapes across bands",
    "900006": "mostly non-finite image",
    "900007": "missing spectrum",
    "900008": "empty spectrum",
    "900009": "non-numeric spectrum",
    "900010": "non-monotonic wavelengths",
    "900011": "duplicated wavelengths",
    "900012": "fewer than 500 valid pixels on the grid",
    "900013": "data.csv row with no galaxy folder",
    "900014": "galaxy folder with no data.csv row",
    "900015": "no usable zero point (MAGZERO or EXPTIME)",
}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepare")
  raw = str(root / "raw")
  ids = mock.generate_survey(raw, NUM_GOOD, seed=0, num_workers=1)
  catalog = os.path.join(raw, "data.csv")
  header, *rows = open(catalog).read().splitlines()
  src = ids[0]
  def copy(new_id, with_row=True):
    return _copy_galaxy(raw, src, new_id, rows if with_row else None)
  img = lambda d, new_id, band: os.path.join(d, "images", f"{new_id}_{band}.fits")

  os.remove(img(copy("900001"), "900001", "y"))
  d = copy("900002")
  data = open(img(d, "900002", "g"), "rb").read()
  open(img(d, "900002", "g"), "wb").write(data[: len(data) // 2])
  d = copy("900003")
  open(img(d, "900003", "r"), "wb").write(b"this is not a FITS file" * 100)
  d = copy("900004")
  for band in grid.PS1_BANDS:
    _write_image(img(d, "900004", band), np.zeros((100, 100)))
  d = copy("900005")
  _write_image(img(d, "900005", "i"), np.zeros((144, 144)))
  d = copy("900006")
  image, fits_header = fits_io.read_image(img(d, "900006", "r"))
  image = image.copy()
  image.reshape(-1)[: int(0.8 * image.size)] = np.nan
  _write_image(img(d, "900006", "r"), image, fits_header)  # Its zero point kept.
  os.remove(os.path.join(copy("900007"), "spectrum", "spectrum.csv"))
  _rewrite_spectrum(copy("900008"), lambda lines: lines[:1])
  _rewrite_spectrum(copy("900009"), lambda lines: lines[:50] + ["5000.0,abc"] + lines[51:])
  _rewrite_spectrum(copy("900010"), lambda lines: lines[:50] + [lines[51], lines[50]] + lines[52:])
  _rewrite_spectrum(copy("900011"), lambda lines: lines[:50] + [lines[50]] + lines[50:])
  _rewrite_spectrum(copy("900012"), lambda lines: lines[:200])
  rows.append(rows[0].replace(f"'{src}'", "'900013'"))   # A row whose folder does not exist.
  copy("900014", with_row=False)
  d = copy("900015")
  with fits.open(img(d, "900015", "i"), mode="update") as hdus:  # No MAGZERO, EXPTIME 0.
    del hdus[0].header["MAGZERO"]
    hdus[0].header["EXPTIME"] = 0.0
  rows.append(rows[1])                                   # The same specobj_id twice.
  open(catalog, "w").write("\n".join([header] + rows) + "\n")

  data_dir = str(root / "tfds")
  result = prepare.prepare(raw, data_dir, image_size=32, num_workers=1)
  return dict(raw=raw, ids=ids, rows=rows, result=result, duplicate=ids[1])


def test_every_raw_galaxy_is_written_or_rejected(survey):
  result = survey["result"]
  num_rows = len(survey["rows"])                   # Includes the duplicate and the folderless row.
  num_raw = num_rows + 1                           # Plus the folder without a row.
  assert sum(result["written"].values()) == NUM_GOOD
  assert sum(result["written"].values()) + result["rejected"] == num_raw
  splits = [preprocess.split_of(i) for i in survey["ids"]]
  assert result["written"] == {s: splits.count(s) for s in ("train", "validation", "test")}


def test_each_broken_galaxy_has_its_reason(survey):
  path = os.path.join(survey["result"]["dataset_dir"], "rejected.jsonl")
  rejected = [json.loads(l) for l in open(path)]
  by_id = {}
  for r in rejected:
    by_id.setdefault(r["specobj_id"], []).append(r)
  for specobj_id, reason in BROKEN.items():
    assert [r["reason"] for r in by_id[specobj_id]] == [reason], specobj_id
    assert by_id[specobj_id][0]["path"].startswith(survey["raw"])
  assert by_id["900002"][0]["path"].endswith("900002_g.fits")
  assert by_id["900006"][0]["path"].endswith("900006_r.fits")     # The band's file, and band.
  assert by_id["900015"][0]["path"].endswith("900015_i.fits")
  assert by_id["900015"][0]["detail"] == "band i"
  assert [r["reason"] for r in by_id[survey["duplicate"]]] == ["duplicate specobj_id"]
  assert by_id["900012"][0]["detail"] == "199 valid"
  manifest = [json.loads(l) for l in open(survey["result"]["manifest"])]
  assert len(manifest) == sum(survey["result"]["written"].values()) + len(rejected)


def test_stored_examples_match_the_raw_files(survey):
  builder = tfds.builder_from_directory(survey["result"]["dataset_dir"])
  ds = builder.as_dataset(split="train", shuffle_files=False)
  spec = ds.element_spec
  assert spec["image"].shape == (5, 32, 32) and spec["flux"].shape == (grid.NUM_PIXELS,)
  assert {k for k in spec} == {"image", "flux", "weight", "z", "has_z", "specobj_id", "ra", "dec",
                               "aperture_flux", "aperture_fluxes", "fiber_diameter"}
  assert spec["aperture_fluxes"].shape == (5, len(photometry.DIAMETERS_ARCSEC))
  assert str(builder.info.version) == astropixel.FIBER_VERSION == "2.1.0"
  meta = builder.info.metadata
  softening = preprocess.ps1_softening_nmgy(grid.PS1_BANDS, 2.5)
  assert meta["softening_nmgy"] == list(softening) and meta["softening_sigmas"] == 2.5
  assert "nanomaggies" in meta["image_unit"]
  catalog = {r.specobj_id: r for r in fits_io.read_catalog(os.path.join(survey["raw"], "data.csv"))}
  with open(os.path.join(survey["raw"], "truth.csv")) as f:
    truths = {row["specobj_id"].strip("'"): row for row in csv.DictReader(f)}
  checked = 0
  fibers = set()
  for ex in tfds.as_numpy(ds):
    specobj_id = ex["specobj_id"].decode()
    galaxy_dir = os.path.join(survey["raw"], f"Galaxy_{specobj_id}")
    spectrum = fits_io.read_spectrum_csv(os.path.join(galaxy_dir, "spectrum", "spectrum.csv"))
    # The CSV sits on the grid's lattice: stored flux equals the CSV values at the same pixels.
    i0 = int(round((np.log10(spectrum.wavelength[0]) - grid.LOGLAM0) / grid.DLOGLAM))
    inside = slice(max(i0, 0), min(i0 + len(spectrum.flux), grid.NUM_PIXELS))
    src = slice(inside.start - i0, inside.stop - i0)
    np.testing.assert_allclose(ex["flux"][inside], spectrum.flux[src], rtol=1e-6, atol=1e-6)
    assert np.all(ex["weight"][inside] == 1.0)
    assert np.all(ex["weight"][: inside.start] == 0) and np.all(ex["weight"][inside.stop:] == 0)
    row = catalog[specobj_id]
    assert ex["has_z"] and ex["z"] == np.float32(row.z)
    assert ex["ra"] == row.ra and ex["dec"] == row.dec
    images, headers = fits_io.read_images(galaxy_dir, specobj_id)
    truth = truths[specobj_id]
    # The fiber, from the catalogue's MJD, is the one the mock took the spectrum through.
    assert ex["fiber_diameter"] == float(truth["fiber_diameter_arcsec"]) == row.fiber_diameter
    fibers.add(float(ex["fiber_diameter"]))
    # The stored 3 arcsec aperture equals the same measurement on the raw cutouts, and against the
    # mock's truth fiber magnitude (through the fiber's own diameter and the spectrograph's seeing,
    # broader than the image PSF) it holds at least as much light, within 0.6 mag.
    np.testing.assert_allclose(ex["aperture_flux"], preprocess.aperture_flux(images, headers),
                               rtol=1e-6)
    np.testing.assert_array_equal(ex["aperture_fluxes"],
                                  photometry.aperture_fluxes(images, headers))
    np.testing.assert_array_equal(ex["aperture_fluxes"][:, 1], ex["aperture_flux"])
    fiber = preprocess.aperture_flux(images, headers, float(truth["fiber_diameter_arcsec"]))
    excess = float(truth["fibermag_r_ab"]) - (22.5 - 2.5 * np.log10(fiber[1]))
    assert -0.1 < excess < 0.6, (specobj_id, excess)
    stretched = preprocess.stretch(images, preprocess.zero_points(headers), softening)
    binned = preprocess.bin_image(stretched, 9)
    assert ex["image"].dtype == np.float16
    np.testing.assert_array_equal(ex["image"], binned.astype(np.float16))
    # float16 rounds to within half a unit in the last place (2^-11 relative, 2^-25 absolute among
    # the subnormals), negligible next to the pixel noise of the stretched image: here, binned 9x9
    # (noise 9x below the raw pixels'), its RMS is ~1e-3 of the noise (1e-6 of the variance).
    error = ex["image"].astype(np.float32) - binned
    assert np.all(np.abs(error) <= 2.0**-11 * np.abs(binned) + 2.0**-25)
    sky_noise = 1.4826 * np.median(np.abs(binned - np.median(binned, axis=(1, 2), keepdims=True)),
                                   axis=(1, 2))
    assert np.all(np.sqrt(np.mean(error**2, axis=(1, 2))) < 1e-2 * sky_noise), sky_noise
    checked += 1
  assert checked == survey["result"]["written"]["train"]
  assert fibers == {2.0, 3.0}


def _aperture_colours(fluxes):
  """Adjacent-band colours (bands - 1,) in magnitudes of (bands,) fluxes."""
  return -2.5 * np.log10(fluxes[:-1] / fluxes[1:])


def test_aperture_colours_from_the_stored_input_equal_the_catalogue(survey):
  # The stored input inverted, f = softening x sinh(x), on the un-binned 288 px image (the very
  # example prepare stores, float16 included), summed in the 3 arcsec aperture: the same colours
  # as preprocess.aperture_flux on the raw FITS, well within their photometric noise (sky and
  # Poisson noise of the aperture's pixels, from the headers' SKYSIG, gain 1). float16 rounding
  # is the only difference: at most ~3e-4 relative per aperture, ~0.3 sigma of that noise (see
  # examples.image_example). The old stretch's colours, over each cutout's own sky sigma and
  # inverted so, were off by ~0.1 mag typically (scatter 0.14-0.18 mag) on mock galaxies.
  config = examples.ExampleConfig.of(astropixel.make_config(image_size=288))
  softening = np.array(config.softening_nmgy)
  catalog = {r.specobj_id: r for r in fits_io.read_catalog(os.path.join(survey["raw"], "data.csv"))}
  inside = preprocess._aperture_pixels(288, 288, 3.0, preprocess.PS1_PIXEL_SCALE_ARCSEC)
  for specobj_id in survey["ids"]:
    galaxy_dir = os.path.join(survey["raw"], f"Galaxy_{specobj_id}")
    x = examples.galaxy_example(galaxy_dir, catalog[specobj_id], config)["image"]
    assert x.shape == (5, 288, 288) and x.dtype == np.float16
    f = softening[:, None] * np.sinh(x.reshape(5, -1)[:, inside].astype(np.float64))
    images, headers = fits_io.read_images(galaxy_dir, specobj_id)
    want = preprocess.aperture_flux(images, headers).astype(np.float64)
    counts = images.reshape(5, -1)[:, inside].astype(np.float64)
    sky = np.array([h["SKYSIG"] for h in headers])
    sigma = np.sqrt((sky[:, None] ** 2 + np.maximum(counts, 0)).sum(axis=1)) * (
        preprocess.nmgy_per_count(preprocess.zero_points(headers)))
    colour_sigma = 2.5 / np.log(10) * np.hypot(sigma[:-1] / want[:-1], sigma[1:] / want[1:])
    error = _aperture_colours(f.sum(axis=1)) - _aperture_colours(want)
    assert np.all(np.abs(error) < 0.5 * colour_sigma), (specobj_id, error / colour_sigma)
    assert np.all(np.abs(error) < 2e-3), (specobj_id, error)


def _aged(dataset_dir, dest, version="1.2.0", calibrated=False):
  """A copy of a prepared dataset made to look like astropixel `version`: that version, and
  unless `calibrated` the metadata it wrote before calibration (stretch_beta, no softening)."""
  shutil.copytree(dataset_dir, dest)
  info_path = os.path.join(dest, "dataset_info.json")
  info = json.load(open(info_path))
  info["version"] = version
  json.dump(info, open(info_path, "w"))
  if calibrated:
    return str(dest)
  meta_path = os.path.join(dest, "metadata.json")
  meta = json.load(open(meta_path))
  for key in ("softening_nmgy", "softening_sigmas", "sky_sigma_nmgy", "image_unit"):
    del meta[key]
  json.dump(dict(meta, stretch_beta=2.5), open(meta_path, "w"))
  return str(dest)


def test_training_refuses_an_uncalibrated_dataset_and_says_how_to_prepare_it(survey, tmp_path):
  config = baseline.get_config("tiny")
  config.raw_dir = survey["raw"]
  dataset_dir = survey["result"]["dataset_dir"]
  datasets.check_dataset(config, dataset_dir)  # Calibrated, and what the config asks for.
  config.data_dir = _aged(dataset_dir, tmp_path / "astropixel" / "grizy-32px-beta2.5" / "1.2.0")
  assert datasets.ensure_dataset(config, str(tmp_path / "run")) == config.data_dir
  with pytest.raises(ValueError) as excinfo:
    datasets.check_dataset(config, config.data_dir)
  message = str(excinfo.value)
  assert "uncalibrated" in message and "1.2.0" in message
  assert (f"python -m astra_jax.data.prepare --raw_dir {survey['raw']} --data_dir {tmp_path} "
          "--bands g,r,i,z,y --image_size 32 --softening_sigmas 2.5") in message
  # A calibrated version whose metadata lacks the softening is refused too.
  aged = _aged(dataset_dir, tmp_path / "other", version=astropixel.CALIBRATED_VERSION)
  with pytest.raises(ValueError, match="uncalibrated"):
    datasets.check_dataset(config, aged)
  # A calibrated one from before the fiber was stored is refused with its own reason.
  aged = _aged(dataset_dir, tmp_path / "fiberless", version=astropixel.CALIBRATED_VERSION,
               calibrated=True)
  with pytest.raises(ValueError, match="has no fiber_diameter.*python -m astra_jax.data.prepare"):
    datasets.check_dataset(config, aged)
  config.softening_sigmas = 1.0
  with pytest.raises(ValueError, match="softening_sigmas=2.5"):
    datasets.check_dataset(config, dataset_dir)


def test_cli_prints_the_summary_line_and_reuses(survey, tmp_path):
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(survey["result"]["dataset_dir"])))
  out = subprocess.run(
      [sys.executable, "-m", "astra_jax.data.prepare", "--raw_dir", survey["raw"], "--data_dir",
       data_dir, "--image_size", "32"], capture_output=True, text=True, check=True, timeout=300)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == survey["result"]


def test_missing_catalog_is_a_clear_error(tmp_path):
  with pytest.raises(fits_io.InputError, match="data.csv: missing data.csv"):
    prepare.prepare(str(tmp_path), str(tmp_path / "out"), image_size=32)


def assert_same_examples(dataset_dir, reference_dir):
  """Both prepared datasets hold the same splits and, split by split, equal examples in order."""
  builder = tfds.builder_from_directory(dataset_dir)
  reference = tfds.builder_from_directory(reference_dir)
  assert set(builder.info.splits) == set(reference.info.splits)
  for split in builder.info.splits:
    ours = builder.as_dataset(split=split, shuffle_files=False)
    theirs = reference.as_dataset(split=split, shuffle_files=False)
    for a, b in zip(tfds.as_numpy(ours), tfds.as_numpy(theirs), strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_workers_give_the_same_dataset(survey, tmp_path):
  result = prepare.prepare(survey["raw"], str(tmp_path), image_size=32, num_workers=2)
  for name in ("manifest.jsonl", "rejected.jsonl"):
    with open(os.path.join(result["dataset_dir"], name)) as f:
      with open(os.path.join(survey["result"]["dataset_dir"], name)) as g:
        assert f.read() == g.read(), name
  assert_same_examples(result["dataset_dir"], survey["result"]["dataset_dir"])


def test_raw_dir_on_a_non_local_filesystem(survey, ram_copy, tmp_path):
  # The broken survey copied to ram:// (read through epath, as gs:// is): the same galaxies
  # written, the same rejections with the same reasons, naming the same files under the URL.
  # One reader: ram:// lives in this process, which spawned readers cannot see (a bucket they can).
  url = ram_copy(survey["raw"], "raw")
  result = prepare.prepare(url, str(tmp_path), image_size=32, num_workers=1)
  assert result["written"] == survey["result"]["written"]
  read = lambda d, name: open(os.path.join(d, name)).read()
  local = survey["result"]["dataset_dir"]
  assert read(result["dataset_dir"], "manifest.jsonl") == read(local, "manifest.jsonl")
  rejected = read(result["dataset_dir"], "rejected.jsonl")
  assert rejected.count(url) == read(local, "rejected.jsonl").count(survey["raw"]) > 10
  assert rejected.replace(url, survey["raw"]) == read(local, "rejected.jsonl")
  assert_same_examples(result["dataset_dir"], local)


def test_reader_processes_do_not_import_tensorflow(survey):
  row = next(r for r in fits_io.read_catalog(os.path.join(survey["raw"], "data.csv"))
             if r.specobj_id == survey["ids"][0])
  job = (os.path.join(survey["raw"], f"Galaxy_{row.specobj_id}"), row,
         examples.ExampleConfig.of(astropixel.make_config(image_size=32)))
  with examples.reader_pool(1) as pool:
    key, example, rejected = pool.apply(examples.try_example, (job,))
    loaded = pool.apply(eval, ("[m for m in ('tensorflow', 'tensorflow_datasets', 'jax') "
                               "if m in __import__('sys').modules]",))
  assert key == row.specobj_id and rejected is None and example["image"].shape == (5, 32, 32)
  assert loaded == []


def test_imap_bounded_keeps_order_and_bounds_the_jobs_ahead_of_a_slow_consumer():
  # A writer slower than the readers: plain imap lets all 40 jobs run ahead; this keeps the pool
  # at most `ahead` jobs past what the consumer has taken, and yields in the jobs' order.
  started = []

  def read(job):
    started.append(job)
    time.sleep(0.001 * (job % 3))  # Finishing out of order.
    return job, np.full(1 << 16, job, np.float32)  # A result worth holding back: 256 KB.

  ahead, leads, out = 6, [], []
  with multiprocessing.pool.ThreadPool(2) as pool:
    for job, array in examples.imap_bounded(pool, read, range(40), ahead=ahead):
      out.append(job)
      assert array[0] == job
      time.sleep(0.005)  # Serialising and writing the example.
      leads.append(len(started) - len(out))
    assert out == list(range(40)) and len(started) == 40
    assert max(leads) <= ahead and max(leads) >= ahead - 2, leads  # Bounded, yet kept busy.
    with multiprocessing.pool.ThreadPool(2) as unbounded:
      started.clear()
      for k, _ in enumerate(unbounded.imap(read, range(40), 2)):
        time.sleep(0.005)
        if k == 5:
          assert len(started) > 5 + ahead  # What the bound is for.
          break
