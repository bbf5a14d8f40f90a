"""Prediction from a folder of cutouts: same numbers as the prepared dataset, rejections, layouts.

One tiny run's workdir (a host-drawn checkpoint at step 1) and one prediction of the whole tiny
mock survey (`full`) are made once for the module; the other folders are built from its cutouts.
"""

import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys

from astropy.io import fits
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from astra_jax import analysis
from astra_jax import checkpoint
from astra_jax import evaluate
from astra_jax import grid
from astra_jax import predict
from astra_jax import sharding
from astra_jax import train
from astra_jax.data import fits_io
from astra_jax.data import pipeline
from experiments.configs import baseline

from conftest import host_params  # pylint: disable=g-bad-import-order (tests/ is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # Two galaxies per fake device; every call below compiles the same shape.


@pytest.fixture(scope="module")
def workdir(tiny_dataset, tmp_path_factory):
  """A tiny run's workdir: config.json and a TrainState checkpoint at step 1 (Orbax, as trained)."""
  config = baseline.get_config("tiny")
  config.data_dir = tiny_dataset
  workdir = str(tmp_path_factory.mktemp("predict_run"))
  train.measure_photometry_statistics(config, tiny_dataset)  # As training does.
  train.write_config(config, workdir)
  model, tx = train.make_model(config), train.make_optimizer(config)
  abstract = train.abstract_state(config, model, tx, sharding.create_mesh())
  state = train.TrainState(
      step=np.int32(1), params=host_params(abstract.params, 1),
      opt_state=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.opt_state))
  state = jax.device_put(state, jax.tree.map(lambda s: s.sharding, abstract))
  latest, best = checkpoint.checkpoint_managers(workdir, config)
  latest.save(1, args=ocp.args.StandardSave(state))
  for manager in (latest, best):
    manager.wait_until_finished()
    manager.close()
  return workdir


@pytest.fixture(scope="module")
def raw_dir(tiny_dataset):
  """The ASTROPIXEL folder the tiny dataset was prepared from (conftest's `root/raw`)."""
  for parent in pathlib.Path(tiny_dataset).parents:
    if (parent / "raw" / "data.csv").exists():
      return str(parent / "raw")
  raise FileNotFoundError(f"no raw/ above {tiny_dataset}")


def read_table(path):
  """{specobj_id: {column: value}} and the header of a predictions file."""
  with fits.open(path) as hdus:
    table, header = hdus["PREDICTIONS"].data, hdus["PREDICTIONS"].header
    rows = {str(r["specobj_id"]): {n: np.array(r[n]) for n in table.columns.names}
            for r in table}
    return rows, header, [h.name for h in hdus], hdus["Z_EDGES"].data.copy()


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full(workdir, raw_dir, tmp_path_factory):
  """(summary, rows) of predicting the whole tiny survey from its raw folder, in this process."""
  out = str(tmp_path_factory.mktemp("full") / "predictions.fits")
  summary = predict.predict_folder(workdir, raw_dir, out, batch_size=BATCH, num_workers=0)
  return summary, read_table(out)[0]


def copy_images(raw_dir, ids, dest):
  """Galaxy_{id}/images/ of `ids` (no spectra) into `dest`."""
  for i in ids:
    shutil.copytree(os.path.join(raw_dir, f"Galaxy_{i}", "images"),
                    os.path.join(dest, f"Galaxy_{i}", "images"))


def survey_ids(raw_dir):
  return [r.specobj_id for r in fits_io.read_catalog(os.path.join(raw_dir, "data.csv"))]


def assert_same_rows(got, want, ids, atol=1e-5, coords=False):
  """The predictions of `ids` agree within `atol`; with `coords`, ra and dec exactly."""
  for i in ids:
    if coords:
      np.testing.assert_array_equal([got[i]["ra"], got[i]["dec"]], [want[i]["ra"], want[i]["dec"]])
    for name in ("flux_pred", "z_pdf", "z_mean", "z_mode", "z_lo", "z_hi"):
      np.testing.assert_allclose(got[i][name], want[i][name], rtol=1e-5, atol=atol,
                                 err_msg=f"{i} {name}")


def test_folder_predictions_match_the_prepared_dataset(workdir, tiny_dataset, raw_dir, full):
  summary, rows = full
  _, model, params = analysis.restore(workdir)
  # Every split of the prepared dataset: the same galaxies through `prepare`'s image path.
  ids, images, fluxes, coords = [], [], [], []
  for split in ("train", "validation", "test"):
    for batch in pipeline.as_numpy(pipeline.eval_dataset(
        tiny_dataset, split, global_batch=BATCH, extra_keys=("specobj_id", "ra", "dec"))):
      mask = batch["mask"].astype(bool)
      ids += [s.decode() for s in batch["specobj_id"][mask]]
      images.append(batch["image"][mask])
      fluxes.append(batch["aperture_fluxes"][mask])
      coords.append(np.stack([batch["ra"][mask], batch["dec"][mask]], axis=1))
  # The table's spectra are the light in an SDSS 3 arcsec fiber unless asked for another.
  want = analysis.predict(model, params, np.concatenate(images), np.concatenate(fluxes),
                          batch_size=BATCH, fiber_diameter=3.0)
  coords = np.concatenate(coords)
  assert sorted(ids) == sorted(survey_ids(raw_dir)) == sorted(rows) and len(ids) == 24
  assert list(rows) == sorted(rows)  # Rows in id order.
  # Galaxies differ by far more than the tolerance, so a row matched to the wrong one fails.
  assert np.abs(want["flux"][1:] - want["flux"][:-1]).max(axis=1).min() > 1e-3
  for k, i in enumerate(ids):
    np.testing.assert_allclose(rows[i]["flux_pred"], want["flux"][k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[i]["z_mean"], want["z_mean"][k], rtol=1e-5, atol=1e-5)
    for name in ("z_pdf", "z_mode", "z_lo", "z_hi"):
      np.testing.assert_allclose(rows[i][name], want[name][k], rtol=1e-5, atol=1e-5, err_msg=name)
    # WCS centre vs data.csv (written to 8 significant digits).
    np.testing.assert_allclose([rows[i]["ra"], rows[i]["dec"]], coords[k], atol=1e-5)

  # Truth found beside the images (truth.csv) and scored like evaluate does.
  truth = predict.read_truth(os.path.join(raw_dir, "truth.csv"))
  metrics = evaluate.redshift_metrics([rows[i]["z_mean"] for i in ids], [truth[i] for i in ids])
  assert summary["truth"] == os.path.join(raw_dir, "truth.csv")
  assert summary["z_num_truth"] == 24
  np.testing.assert_allclose(summary["z_sigma_mad"], metrics["sigma_mad"], rtol=1e-6)
  assert summary["z_outlier_fraction"] == metrics["outlier_fraction"]
  assert (summary["predicted"], summary["rejected"], summary["reasons"]) == (24, 0, {})
  assert summary["galaxies_per_s"] > 0
  assert read_jsonl(summary["rejections"]) == []


def test_table_layout(workdir, raw_dir, full):
  summary, _ = full
  rows, header, names, edges = read_table(summary["out"])
  assert names == ["PRIMARY", "PREDICTIONS", "Z_EDGES"]
  assert list(next(iter(rows.values()))) == ["specobj_id", "ra", "dec", "z_mean", "z_mode", "z_lo",
                                             "z_hi", "z_pdf", "flux_pred"]
  with fits.open(summary["out"]) as hdus:
    hdus.verify("exception")  # Valid FITS, the streamed NAXIS2 included.
    table = hdus["PREDICTIONS"].data
    assert table["flux_pred"].shape == (24, grid.NUM_PIXELS) and table["z_pdf"].shape == (24, 30)
    units = {c.name: c.unit for c in table.columns}
  assert units["flux_pred"] == "1e-17 erg/s/cm^2/Angstrom" and units["ra"] == "deg"
  assert (header["LOGLAM0"], header["DLOGLAM"], header["NPIX"]) == (3.58, 1e-4, 4000)
  assert header["BANDS"] == "g,r,i,z,y" and header["IMGSIZE"] == 32 and header["RESIZE"] == "reject"
  assert header["FIBERDIA"] == 3.0
  np.testing.assert_allclose(edges, np.linspace(0, 0.6, 31))
  assert summary["rejections"] == summary["out"].replace(".fits", ".rejected.jsonl")


def test_the_fiber_asked_for_scales_the_spectra_alone(workdir, raw_dir, full, tmp_path):
  _, sdss = full
  ids = survey_ids(raw_dir)[:4]
  folder = str(tmp_path / "four")
  copy_images(raw_dir, ids, folder)
  out = str(tmp_path / "boss.fits")
  predict.predict_folder(workdir, folder, out, batch_size=BATCH, num_workers=0,
                         fiber_diameter=2.0)
  boss, header, _, _ = read_table(out)
  assert header["FIBERDIA"] == 2.0
  for i in ids:
    # One amplitude per galaxy: the BOSS spectrum is the SDSS one times a factor.
    ratio = boss[i]["flux_pred"] / sdss[i]["flux_pred"]
    np.testing.assert_allclose(ratio, np.median(ratio), rtol=1e-4)
    assert abs(np.log10(np.median(ratio))) > 1e-4
    for name in ("z_pdf", "z_mean"):
      np.testing.assert_allclose(boss[i][name], sdss[i][name], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="fiber_diameter must be one of"):
    predict.predict_folder(workdir, folder, out, num_workers=0, fiber_diameter=1.5)


def write_like(path, template, data):
  """A cutout with `template`'s header and `data` (the WCS centred on the new shape)."""
  with fits.open(template) as hdus:
    header = hdus[0].header.copy()
  scale = data.shape[0] / header["NAXIS1"]
  header["CRPIX1"] = header["CRPIX2"] = (data.shape[0] - 1) / 2 + 1
  header["CDELT1"], header["CDELT2"] = header["CDELT1"] / scale, header["CDELT2"] / scale
  fits.PrimaryHDU(data.astype(np.float32), header).writeto(path, overwrite=True)


def test_broken_cutouts_are_rejected_with_their_reasons(workdir, raw_dir, full, tmp_path):
  ids = survey_ids(raw_dir)[:6]
  folder = str(tmp_path / "broken")
  copy_images(raw_dir, ids, folder)
  band = lambda i, b: os.path.join(folder, f"Galaxy_{i}", "images", f"{i}_{b}.fits")
  os.remove(band(ids[0], "r"))
  with open(band(ids[1], "i"), "r+b") as f:
    f.truncate(os.path.getsize(band(ids[1], "i")) // 2)
  for b in "grizy":
    write_like(band(ids[2], b), band(ids[2], b), np.ones((100, 100)))
  with fits.open(band(ids[3], "z")) as hdus:
    data = hdus[0].data.copy()
  data[:230] = np.nan  # 80 % of the band.
  write_like(band(ids[3], "z"), band(ids[3], "z"), data)

  out = str(tmp_path / "out" / "broken.fits")
  summary = predict.predict_folder(workdir, folder, out, batch_size=BATCH, num_workers=0)
  rejected = read_jsonl(str(tmp_path / "out" / "broken.rejected.jsonl"))
  reasons = {r["specobj_id"]: r["reason"] for r in rejected}
  assert reasons == {ids[0]: "missing band file", ids[1]: "unreadable or truncated FITS",
                     ids[2]: "wrong image shape", ids[3]: "mostly non-finite image"}
  paths = {r["specobj_id"]: r["path"] for r in rejected}
  assert paths[ids[0]] == band(ids[0], "r") and paths[ids[1]] == band(ids[1], "i")
  rows, _, _, _ = read_table(out)
  assert sorted(rows) == sorted(ids[4:])
  assert_same_rows(rows, full[1], ids[4:])
  assert (summary["predicted"], summary["rejected"]) == (2, 4)
  assert "truth" not in summary  # No truth.csv or data.csv in that folder.


def test_flat_folder(workdir, raw_dir, full, tmp_path):
  ids = survey_ids(raw_dir)[6:9]
  folder = tmp_path / "flat"
  folder.mkdir()
  for i in ids:
    for b in "grizy":
      shutil.copy(os.path.join(raw_dir, f"Galaxy_{i}", "images", f"{i}_{b}.fits"), folder)
  with open(folder / f"{ids[0]}_g.fits", "rb") as f, gzip.open(folder / f"{ids[0]}_g.fits.gz",
                                                              "wb") as g:
    g.write(f.read())
  os.remove(folder / f"{ids[0]}_g.fits")  # Read from the .gz.
  (folder / "notes.txt").write_text("not a cutout")
  out = str(tmp_path / "flat.fits")
  summary = predict.predict_folder(workdir, str(folder), out, batch_size=BATCH, num_workers=0,
                                   truth=os.path.join(raw_dir, "data.csv"))
  rows, _, _, _ = read_table(out)
  assert sorted(rows) == sorted(ids) and summary["rejected"] == 0
  assert_same_rows(rows, full[1], ids, coords=True)
  assert summary["z_num_truth"] == 3


def test_resize_bin_accepts_multiples_and_rejects_the_rest(workdir, raw_dir, full, tmp_path):
  ids = survey_ids(raw_dir)[9:12]
  folder = str(tmp_path / "sizes")
  copy_images(raw_dir, ids, folder)
  for k, i in enumerate(ids):
    for b in "grizy":
      path = os.path.join(folder, f"Galaxy_{i}", "images", f"{i}_{b}.fits")
      with fits.open(path) as hdus:
        data = hdus[0].data.copy()
      # 576: each pixel 2x2 (same stretch, same bins); 300: padded with sky.
      data = np.kron(data, np.ones((2, 2))) if k < 2 else np.pad(data, 6)
      write_like(path, path, data)
  summary = predict.predict_folder(workdir, folder, str(tmp_path / "bin.fits"), batch_size=BATCH,
                                   num_workers=0, resize="bin")
  rows, header, _, _ = read_table(str(tmp_path / "bin.fits"))
  assert sorted(rows) == sorted(ids[:2]) and header["RESIZE"] == "bin"
  # Binning 2 x 2 repeated pixels back rounds in the last float32 bit (3a + a); through the
  # photometry path to the heads that moves the tiny untrained model's fluxes (up to ~2000) by
  # up to ~2e-4 absolute, float noise on that scale.
  assert_same_rows(rows, full[1], ids[:2], atol=1e-3)
  for i in ids[:2]:
    np.testing.assert_allclose([rows[i]["ra"], rows[i]["dec"]],
                               [full[1][i]["ra"], full[1][i]["dec"]], atol=1e-9)
  [rejected] = read_jsonl(summary["rejections"])
  assert (rejected["specobj_id"], rejected["reason"]) == (ids[2], "wrong image shape")
  assert "(300, 300)" in rejected["detail"]

  summary = predict.predict_folder(workdir, folder, str(tmp_path / "reject.fits"),
                                   batch_size=BATCH, num_workers=0)
  assert (summary["predicted"], summary["reasons"]) == (0, {"wrong image shape": 3})
  assert read_table(str(tmp_path / "reject.fits"))[0] == {}  # An empty table, still valid FITS.


def test_cli_prints_the_summary(workdir, raw_dir, full, tmp_path):
  ids = survey_ids(raw_dir)[12:24]
  folder = str(tmp_path / "cli")
  copy_images(raw_dir, ids, folder)
  shutil.rmtree(os.path.join(folder, f"Galaxy_{ids[0]}", "images"))
  shutil.copy(os.path.join(raw_dir, "data.csv"), folder)  # Truth found automatically.
  out = str(tmp_path / "cli.fits")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  # Two reading processes (spawned) feed the model here; the tests above read in-process.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.predict", "--workdir", workdir, "--images", folder,
       "--out", out, "--batch_size", str(BATCH), "--num_workers", "2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)
  lines = proc.stdout.strip().splitlines()
  summary = json.loads(lines[-1])
  assert lines[-2].startswith(f"redshift vs {os.path.join(folder, 'data.csv')} (11 galaxies): ")
  assert (summary["predicted"], summary["rejected"]) == (11, 1)
  assert summary["reasons"] == {"missing band file": 1}
  assert summary["out"] == out and summary["z_num_truth"] == 11
  assert summary["rejections"] == str(tmp_path / "cli.rejected.jsonl")
  assert set(summary) >= {"galaxies_per_s", "z_sigma_mad", "z_outlier_fraction", "z_bias"}
  assert "predict" in proc.stderr  # The tqdm bar.
  rows, _, _, _ = read_table(out)
  assert sorted(rows) == sorted(ids[1:])
  assert_same_rows(rows, full[1], ids[1:])


def test_predict_reads_the_array_prepare_stored(tiny_dataset, raw_dir, tmp_path):
  # The model's inputs straight from the FITS files (`load_galaxy`, no model) equal the prepared
  # dataset's image and aperture fluxes bit for bit: one calibrated path for both.
  config = predict.example_config(baseline.get_config("tiny"), "run")
  builder = pipeline.load_builder(tiny_dataset)
  assert tuple(builder.info.metadata["softening_nmgy"]) == config.softening_nmgy
  stored = {}
  for split in builder.info.splits:
    for ex in builder.as_dataset(split=split).as_numpy_iterator():
      stored[ex["specobj_id"].decode()] = ex["image"], ex["aperture_fluxes"]
  jobs, _ = predict.find_galaxies(raw_dir, config.bands)
  assert sorted(j.specobj_id for j in jobs) == sorted(stored) and len(jobs) == 24
  for job in jobs:
    image, fluxes, _, _ = predict.load_galaxy(job, config, "reject")
    np.testing.assert_array_equal(image, stored[job.specobj_id][0], err_msg=job.specobj_id)
    np.testing.assert_array_equal(fluxes, stored[job.specobj_id][1], err_msg=job.specobj_id)

  # A band without a usable zero point: rejected with its reason, naming its file.
  i = jobs[0].specobj_id
  copy_images(raw_dir, [i], str(tmp_path))
  path = os.path.join(str(tmp_path), f"Galaxy_{i}", "images", f"{i}_z.fits")
  with fits.open(path, mode="update") as hdus:
    del hdus[0].header["MAGZERO"], hdus[0].header["EXPTIME"]
  [job] = predict.find_galaxies(str(tmp_path), config.bands)[0]
  [rejected] = predict.load_task([job], config, "reject")["rejections"]
  assert rejected == {"specobj_id": i, "path": path, "detail": "band z",
                      "reason": "no usable zero point (MAGZERO or EXPTIME)"}


def test_a_model_trained_on_uncalibrated_inputs_is_refused(raw_dir, tmp_path):
  # config.json of a run before calibration: stretch_beta (the per-cutout sky sigma stretch),
  # no softening_sigmas. Refused before anything is read or restored.
  old = baseline.get_config("tiny").to_dict()
  del old["softening_sigmas"]
  old["stretch_beta"] = 2.5
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ValueError, match="trained on uncalibrated inputs.*retrain"):
    predict.predict_folder(str(tmp_path), raw_dir, str(tmp_path / "out.fits"), num_workers=0)
  assert not (tmp_path / "out.fits").exists()


def test_centre_ra_dec_shortcut_agrees_with_the_wcs(raw_dir):
  i = survey_ids(raw_dir)[0]
  header = fits.getheader(os.path.join(raw_dir, f"Galaxy_{i}", "images", f"{i}_g.fits"))
  shape = (header["NAXIS2"], header["NAXIS1"])
  # Centred reference pixel: CRVAL without astropy, as astropy's WCS would say.
  np.testing.assert_allclose(predict.centre_ra_dec(header, shape),
                             fits_io.image_ra_dec(header, shape), rtol=0, atol=1e-9)
  assert predict.centre_ra_dec(header, shape) == (header["CRVAL1"], header["CRVAL2"])
  header["CRPIX1"] += 40  # Off centre: astropy's answer, 10 arcsec away.
  ra_dec = predict.centre_ra_dec(header, shape)
  assert ra_dec == fits_io.image_ra_dec(header, shape) and ra_dec[0] != header["CRVAL1"]
  del header["CTYPE1"], header["CTYPE2"]
  assert np.isnan(predict.centre_ra_dec(header, shape)).all()


def test_output_to_a_url(workdir, raw_dir, full, ram):
  # A bucket cannot patch the table's row count in place: written locally, then copied.
  from etils import epath  # pylint: disable=g-import-not-at-top
  out = f"{ram}/predictions/out.fits"
  summary = predict.predict_folder(workdir, raw_dir, out, batch_size=BATCH, num_workers=0)
  assert summary["out"] == out
  assert summary["rejections"] == f"{ram}/predictions/out.rejected.jsonl"
  local = pathlib.Path(full[0]["out"]).parent / "copied.fits"
  local.write_bytes(epath.Path(out).read_bytes())
  rows, _, _, _ = read_table(str(local))
  assert sorted(rows) == sorted(full[1]) and summary["predicted"] == len(rows)
  assert epath.Path(summary["rejections"]).exists()


def test_input_folder_at_a_url(workdir, raw_dir, full, tmp_path, ram_copy):
  # Cutouts under ram:// (read through epath, as gs:// is), both layouts and a .fits.gz: the
  # same rows as from the local folder, and data.csv found there as the truth table.
  ids = survey_ids(raw_dir)[:4]
  folder = tmp_path / "cutouts"
  copy_images(raw_dir, ids[:3], str(folder))
  for b in "grizy":
    shutil.copy(os.path.join(raw_dir, f"Galaxy_{ids[3]}", "images", f"{ids[3]}_{b}.fits"), folder)
  with open(folder / f"{ids[3]}_r.fits", "rb") as f, gzip.open(folder / f"{ids[3]}_r.fits.gz",
                                                              "wb") as g:
    g.write(f.read())
  os.remove(folder / f"{ids[3]}_r.fits")
  shutil.copy(os.path.join(raw_dir, "data.csv"), folder)
  url = ram_copy(folder, "cutouts")
  jobs, rejected = predict.find_galaxies(url, "grizy")
  assert [j.specobj_id for j in jobs] == sorted(ids) and not rejected
  assert {j.folder for j in jobs} == {f"{url}/Galaxy_{i}/images" for i in ids[:3]} | {url}
  out = str(tmp_path / "out.fits")
  summary = predict.predict_folder(workdir, url, out, batch_size=BATCH, num_workers=0)
  rows, _, _, _ = read_table(out)
  assert sorted(rows) == sorted(ids) and summary["rejected"] == 0
  assert_same_rows(rows, full[1], ids, coords=True)
  assert summary["truth"] == f"{url}/data.csv" and summary["z_num_truth"] == 4
