"""Preparing with Apache Beam (DirectRunner) gives the same dataset and accounts as without Beam."""

import json
import os
import shutil
import sys

from apache_beam.runners.portability import prism_runner
import numpy as np
import pytest
import tensorflow_datasets as tfds

from astra_jax import grid
from astra_jax.data import astropixel
from astra_jax.data import mock
from astra_jax.data import prepare
from astra_jax.data import preprocess

FIELDS = ("image", "flux", "weight", "z", "has_z", "ra", "dec", "aperture_flux")


def _copy_galaxy(raw, source_id, new_id):
  """Copies Galaxy_{source_id} as Galaxy_{new_id}, its files renamed; returns the new folder."""
  dst = os.path.join(raw, f"Galaxy_{new_id}")
  shutil.copytree(os.path.join(raw, f"Galaxy_{source_id}"), dst)
  for band in grid.PS1_BANDS:
    os.rename(os.path.join(dst, "images", f"{source_id}_{band}.fits"),
              os.path.join(dst, "images", f"{new_id}_{band}.fits"))
  return dst


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
  """12 mock galaxies (11 train, 1 validation, no test) and one rejection from each stage."""
  root = tmp_path_factory.mktemp("beam")
  raw = str(root / "raw")
  ids = mock.generate_survey(raw, 12, seed=5, num_workers=1)
  assert [preprocess.split_of(i) for i in ids].count("test") == 0   # An empty split.
  catalog = os.path.join(raw, "data.csv")
  header, *rows = open(catalog).read().splitlines()
  row_of = lambda new_id: rows[0].replace(f"'{ids[0]}'", f"'{new_id}'")
  # Read by a Beam worker (train, after that split's first good galaxy): a missing band file.
  os.remove(os.path.join(_copy_galaxy(raw, ids[0], "900001"), "images", "900001_y.fits"))
  # Read in the launching process, looking for the validation split's first good galaxy.
  os.remove(os.path.join(_copy_galaxy(raw, ids[0], "900002"), "spectrum", "spectrum.csv"))
  assert preprocess.split_of("900001") == "train" and preprocess.split_of("900002") == "validation"
  # Found by the catalogue scan: a row without a folder.
  rows = [row_of("900002")] + rows + [row_of("900001"), row_of("900013")]
  open(catalog, "w").write("\n".join([header] + rows) + "\n")

  plain = prepare.prepare(raw, str(root / "plain"), image_size=32, num_workers=1)
  beam_splits = []
  beam_examples = astropixel.Astropixel._beam_examples
  def spy(self, split, items):
    beam_splits.append((split, len(items)))
    return beam_examples(self, split, items)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(astropixel.Astropixel, "_beam_examples", spy)
    # Beam's DirectRunner first tries Prism, a binary it downloads from GitHub, and falls back to
    # its Python FnApiRunner when that fails: tests stay offline, and on that one runner.
    mp.setattr(prism_runner.PrismRunner, "run_pipeline", _offline)
    beam = prepare.prepare(raw, str(root / "beam"), image_size=32, beam_runner="DirectRunner")
  return dict(raw=raw, plain=plain, beam=beam, beam_splits=beam_splits)


def _offline(*args, **kwargs):
  raise RuntimeError("no Prism in tests")


def test_beam_reads_the_galaxies(survey):
  # Train from its first (good) galaxy, 900001 included; validation after 900002.
  assert survey["beam_splits"] == [("train", 12), ("validation", 1)]


def _lines(result, name):
  with open(os.path.join(result["dataset_dir"], name)) as f:
    return [json.loads(line) for line in f]


def test_same_counts_rejections_and_manifest(survey):
  plain, beam = survey["plain"], survey["beam"]
  assert plain["written"] == beam["written"] == {"train": 11, "validation": 1, "test": 0}
  assert plain["rejected"] == beam["rejected"] == 3
  rejected = _lines(beam, "rejected.jsonl")
  assert [(r["specobj_id"], r["reason"]) for r in rejected] == [
      ("900013", "data.csv row with no galaxy folder"),
      ("900002", "missing spectrum"),
      ("900001", "missing band file")]
  # Same order too: the workers' rejections are put back in the order the plain path meets them.
  assert rejected == _lines(plain, "rejected.jsonl")
  assert _lines(beam, "manifest.jsonl") == _lines(plain, "manifest.jsonl")
  assert not os.path.exists(os.path.join(beam["dataset_dir"], "rejections"))


def _examples(dataset_dir, split):
  ds = tfds.builder_from_directory(dataset_dir).as_dataset(split=split, shuffle_files=False)
  return {ex["specobj_id"].decode(): ex for ex in tfds.as_numpy(ds)}


def test_same_examples(survey):
  splits = tfds.builder_from_directory(survey["plain"]["dataset_dir"]).info.splits
  assert set(splits) == set(tfds.builder_from_directory(survey["beam"]["dataset_dir"]).info.splits)
  assert set(splits) == {"train", "validation"}
  for split in splits:
    plain = _examples(survey["plain"]["dataset_dir"], split)
    beam = _examples(survey["beam"]["dataset_dir"], split)
    assert sorted(plain) == sorted(beam)
    for specobj_id, ex in plain.items():
      for name in FIELDS:
        np.testing.assert_array_equal(beam[specobj_id][name], ex[name], err_msg=name)


def test_beam_options_need_a_runner_and_beam(survey, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="beam_runner"):
    prepare.prepare(survey["raw"], str(tmp_path), beam_options="--direct_num_workers=2")
  monkeypatch.setitem(sys.modules, "apache_beam", None)   # As if the [beam] extra were missing.
  with pytest.raises(ImportError, match=r"pip install 'astra-jax\[beam\]'"):
    prepare.prepare(survey["raw"], str(tmp_path), beam_runner="DirectRunner")
