"""Raw ASTROPIXEL folder -> tfds shards: every galaxy written or rejected with its reason."""

import csv
import json
import multiprocessing.pool
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from astra_jax import grid
from astra_jax.data import astropixel
from astra_jax.data import examples
from astra_jax.data import fits_io
from astra_jax.data import mock
from astra_jax.data import prepare
from astra_jax.data import preprocess

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


def _write_image(path, data):
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  fits.PrimaryHDU(np.asarray(data, np.float32)).writeto(path, overwrite=True)


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
  image, _ = fits_io.read_image(img(d, "900006", "r"))
  image = image.copy()
  image.reshape(-1)[: int(0.8 * image.size)] = np.nan
  _write_image(img(d, "900006", "r"), image)
  os.remove(os.path.join(copy("900007"), "spectrum", "spectrum.csv"))
  _rewrite_spectrum(copy("900008"), lambda lines: lines[:1])
  _rewrite_spectrum(copy("900009"), lambda lines: lines[:50] + ["5000.0,abc"] + lines[51:])
  _rewrite_spectrum(copy("900010"), lambda lines: lines[:50] + [lines[51], lines[50]] + lines[52:])
  _rewrite_spectrum(copy("900011"), lambda lines: lines[:50] + [lines[50]] + lines[50:])
  _rewrite_spectrum(copy("900012"), lambda lines: lines[:200])
  rows.append(rows[0].replace(f"'{src}'", "'900013'"))   # A row whose folder does not exist.
  copy("900014", with_row=False)
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
                               "aperture_flux"}
  catalog = {r.specobj_id: r for r in fits_io.read_catalog(os.path.join(survey["raw"], "data.csv"))}
  with open(os.path.join(survey["raw"], "truth.csv")) as f:
    truths = {row["specobj_id"].strip("'"): row for row in csv.DictReader(f)}
  checked = 0
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
    # The stored 3 arcsec aperture equals the same measurement on the raw cutouts, and against the
    # mock's truth fiber magnitude (through the fiber's own diameter and the spectrograph's seeing,
    # broader than the image PSF) it holds at least as much light, within 0.6 mag.
    np.testing.assert_allclose(ex["aperture_flux"], preprocess.aperture_flux(images, headers),
                               rtol=1e-6)
    fiber = preprocess.aperture_flux(images, headers, float(truth["fiber_diameter_arcsec"]))
    excess = float(truth["fibermag_r_ab"]) - (22.5 - 2.5 * np.log10(fiber[1]))
    assert -0.1 < excess < 0.6, (specobj_id, excess)
    stretched, _ = preprocess.stretch(images, 2.5)
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


def test_cli_prints_the_summary_line_and_reuses(survey, tmp_path):
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(survey["result"]["dataset_dir"])))
  out = subprocess.run(
      [sys.executable, "-m", "astra_jax.data.prepare", "--raw_dir", survey["raw"], "--data_dir",
       data_dir, "--image_size", "32"], capture_output=True, text=True, check=True, timeout=300)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == survey["result"]


def test_missing_catalog_is_a_clear_error(tmp_path):
  with pytest.raises(fits_io.InputError, match="data.csv: missing data.csv"):
    prepare.prepare(str(tmp_path), str(tmp_path / "out"), image_size=32)


def test_workers_give_the_same_dataset(survey, tmp_path):
  result = prepare.prepare(survey["raw"], str(tmp_path), image_size=32, num_workers=2)
  for name in ("manifest.jsonl", "rejected.jsonl"):
    with open(os.path.join(result["dataset_dir"], name)) as f:
      with open(os.path.join(survey["result"]["dataset_dir"], name)) as g:
        assert f.read() == g.read(), name
  builder = tfds.builder_from_directory(result["dataset_dir"])
  reference = tfds.builder_from_directory(survey["result"]["dataset_dir"])
  assert set(builder.info.splits) == set(reference.info.splits)
  for split in builder.info.splits:
    ours = builder.as_dataset(split=split, shuffle_files=False)
    theirs = reference.as_dataset(split=split, shuffle_files=False)
    for a, b in zip(tfds.as_numpy(ours), tfds.as_numpy(theirs), strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


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
