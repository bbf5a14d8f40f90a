"""Raw ASTROPIXEL folder -> tfds shards: every galaxy written or rejected with its reason."""

import csv
import functools
import json
import multiprocessing
import multiprocessing.pool
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
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


def _faults_of_fresh_blocks(n=20, blocks=4, nbytes=2 << 20):
  """Minor page faults of `n` rounds of filling `blocks` arrays of `nbytes` at once and freeing
  them (what a galaxy's arrays do), after a first such round."""
  def one_round():
    arrays = [np.ones(nbytes // 4, np.float32) for _ in range(blocks)]
    del arrays
  one_round()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(n):
    one_round()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_reader_processes_keep_freed_memory():
  # A galaxy's arrays (a few of 1.7 MB at once) outgrow glibc's default trim threshold: without
  # the reader pool's initializer each galaxy's are faulted in anew (512 faults per 2 MB with
  # 4 KiB pages, one with huge pages); with it, after the first galaxy, none.
  with examples.reader_pool(1) as pool:
    kept = pool.apply(_faults_of_fresh_blocks)
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    fresh = pool.apply(_faults_of_fresh_blocks)
  assert fresh >= 20 and kept * 10 < fresh, (kept, fresh)


def test_shared_results_bounds_the_jobs_ahead_of_a_slow_consumer():
  # A writer slower than the readers: plain imap lets all 40 jobs run ahead; this keeps the pool
  # at most `ahead` jobs past what the consumer has taken.
  started = []

  def read(job):
    started.append(job)
    return job, np.full(1 << 16, job, np.float32)  # A result worth holding back: 256 KB.

  ahead, leads, out = 6, [], []
  with multiprocessing.pool.ThreadPool(2) as pool:
    for job, array in examples.shared_results(pool, read, range(40), ahead=ahead, chunksize=2):
      out.append(job)
      assert array[0] == job
      time.sleep(0.005)  # Serialising and writing the example.
      leads.append(len(started) - len(out))
    assert sorted(out) == list(range(40)) and len(started) == 40
    assert max(leads) <= ahead and max(leads) >= ahead - 2, leads  # Bounded, yet kept busy.
    with multiprocessing.pool.ThreadPool(2) as unbounded:
      started.clear()
      for k, _ in enumerate(unbounded.imap(read, range(40), 2)):
        time.sleep(0.005)
        if k == 5:
          assert len(started) > 5 + ahead  # What the bound is for.
          break


def test_shared_results_reads_here_while_no_worker_result_waits():
  # One slow worker: the consuming thread reads most jobs itself rather than wait, every job is
  # read once, and none is lost at the ends of the stream.
  here = threading.get_ident()

  def read(job):
    time.sleep(0.02)
    return job, threading.get_ident() == here

  with multiprocessing.pool.ThreadPool(1) as pool:
    results = list(examples.shared_results(pool, read, range(30), ahead=4, chunksize=2))
  assert sorted(job for job, _ in results) == list(range(30))
  by_this_thread = sum(local for _, local in results)
  assert 10 <= by_this_thread < 30, by_this_thread  # About half each: both read the same speed.
  # `local_fn` is what this thread runs: e.g. a job's in-process variant.
  def local(job):
    time.sleep(0.02)
    return job, "local"

  with multiprocessing.pool.ThreadPool(1) as pool:
    results = list(examples.shared_results(pool, read, range(30), ahead=4, chunksize=2,
                                           local_fn=local))
  assert sorted(job for job, _ in results) == list(range(30))
  assert {kind for _, kind in results} == {"local", False}
  with pytest.raises(ValueError, match="ahead"):
    next(examples.shared_results(None, read, range(3), ahead=1, chunksize=2))


def test_shared_results_abandoned_early_frees_the_pool():
  # The pool's task handler waits inside the job generator for a free slot: a consumer that
  # stops early must release it, or the pool would never hand out another task (prepare's next
  # split) and closing it would wait forever.
  pool = multiprocessing.pool.ThreadPool(2)  # Not `with`: a stuck pool would hang its exit.
  stream = examples.shared_results(pool, lambda job: job, range(100), ahead=3)
  assert len([next(stream) for _ in range(2)]) == 2
  time.sleep(0.2)  # The task handler now waits for a slot.
  stream.close()
  task = pool.apply_async(lambda: "next")
  task.wait(timeout=10)
  if not task.ready():
    pool._terminate.cancel()  # pylint: disable=protected-access  # Stuck: fail, not hang at exit.
  assert task.ready() and task.get() == "next"
  pool.terminate()


_KILLED_IN_HANDOFF = """
import os, signal, sys
from astra_jax.data import examples
with examples.handoff_folder(sys.argv[1]) as folder:
  open(os.path.join(folder, "image.npy"), "wb").write(bytes(1000))
  print(folder, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_preparations_handoff_folder_is_removed_by_the_next(tmp_path):
  root = str(tmp_path)
  killed = subprocess.run([sys.executable, "-c", _KILLED_IN_HANDOFF, root], capture_output=True,
                          text=True, check=False)
  assert killed.returncode == -9
  left = killed.stdout.strip()
  assert os.path.basename(left).startswith("astra-prepare-")
  assert os.listdir(left) == ["image.npy"]  # SIGKILL: no exit handler ran.
  ours = tempfile.mkdtemp(prefix=f"astra-prepare-{os.getpid()}-", dir=root)  # A live process's.
  other = os.path.join(root, "astra-prepare-abc")  # No pid in its name.
  os.mkdir(other)
  with examples.handoff_folder(root):  # Just killed: the folder may still be in use elsewhere.
    pass
  assert os.path.isdir(left)
  old = time.time() - examples.STALE_HANDOFF_S - 1
  for folder in (left, ours, other):
    os.utime(folder, (old, old))
  with examples.handoff_folder(root) as folder:
    assert os.path.basename(folder).startswith(f"astra-prepare-{os.getpid()}-")
    assert sorted(os.listdir(root)) == sorted(os.path.basename(f) for f in (folder, ours, other))
  assert not os.path.exists(folder)


def test_reader_processes_hand_images_over_through_files(survey, tmp_path):
  rows = fits_io.read_catalog(os.path.join(survey["raw"], "data.csv"))
  config = examples.ExampleConfig.of(astropixel.make_config(image_size=32))
  jobs = [(fits_io.galaxy_path(survey["raw"], r.specobj_id), r, config) for r in rows
          if r.specobj_id in survey["ids"][:3]]
  direct = [examples.try_example(job) for job in jobs]
  with examples.handoff_folder() as shm, examples.reader_pool(2) as pool:
    assert shm is None or shm.startswith("/dev/shm/")
    folder = shm or str(tmp_path)  # The same code path, where a machine has no /dev/shm.
    handed = pool.map(functools.partial(examples.try_example_handed_over, folder=folder), jobs)
    assert all(isinstance(h[1]["image"], examples.HandedOver) for h in handed)
    assert len(os.listdir(folder)) == len(jobs)
    for (key, example, _), (ref_key, ref, _) in zip(handed, direct, strict=True):
      example = examples.take_image(example)
      assert key == ref_key and set(example) == set(ref)
      for name in ref:
        np.testing.assert_array_equal(example[name], ref[name], err_msg=name)
    assert os.listdir(folder) == []  # Each file goes once its image is read back.
    # Where no file can be written, the image comes back in the result itself.
    _, example, _ = examples.try_example_handed_over(jobs[0], str(tmp_path / "gone"))
    np.testing.assert_array_equal(example["image"], direct[0][1]["image"])
    open(os.path.join(folder, "left.npy"), "wb").close()
  assert shm is None or not os.path.exists(shm)  # It goes, with what a stopped run left in it.
