"""Paths that are not local folders: a prepared dataset and a workdir under TensorFlow's ram://
filesystem, reached through etils.epath's TensorFlow backend (the one it uses for gs://)."""

import itertools
import json

from etils import epath
import numpy as np
import tensorflow as tf

from astra_jax import train
from astra_jax.data import datasets
from astra_jax.data import pipeline
from astra_jax.data import prepare
from experiments.configs import baseline


def test_dataset_and_workdir_on_a_non_local_filesystem(tiny_dataset, ram, ram_copy):
  remote = ram_copy(tiny_dataset, "tfds/astropixel/tiny/2.0.0")
  assert epath.Path(remote, "dataset_info.json").exists()

  # The dataset is found where it is, read as from the local copy, and summarised.
  config = baseline.get_config("tiny")
  config.data_dir = remote
  assert datasets.ensure_dataset(config, f"{ram}/run") == remote
  datasets.check_dataset(config, remote)
  take = lambda d: list(itertools.islice(pipeline.train_dataset(
      d, global_batch=4, seed=0, process_index=1, process_count=2).as_numpy_iterator(), 3))
  for got, want in zip(take(remote), take(tiny_dataset), strict=True):
    np.testing.assert_array_equal(got["image"], want["image"])
  ids = [i for b in pipeline.eval_dataset(remote, "test", global_batch=4, process_index=0,
                                          process_count=1).as_numpy_iterator()
         for i, m in zip(b["specobj_id"], b["mask"]) if m]
  assert len(ids) == 5
  assert prepare.summary(remote)["written"] == prepare.summary(tiny_dataset)["written"]

  # A workdir there: config.json, metrics.jsonl and TensorBoard event files.
  workdir = f"{ram}/run"
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  train.write_config(config, workdir)
  writer = train.MetricWriter(workdir)
  writer.write(3, "train", {"loss": 1.5})
  writer.close()
  assert json.loads(epath.Path(workdir, "config.json").read_text())["data_dir"] == remote
  assert json.loads(epath.Path(workdir, "metrics.jsonl").read_text()) == {
      "step": 3, "split": "train", "loss": 1.5}
  (events,) = tf.io.gfile.listdir(f"{workdir}/tensorboard")
  assert events.startswith("events.out.tfevents")
  assert tf.io.gfile.stat(f"{workdir}/tensorboard/{events}").length > 0


def test_results_written_to_a_non_local_workdir(ram):
  from astra_jax import evaluate
  results = {"ASTRA": {"spectrum_r2": 0.7, "z_median_sigma_mad": 0.02},
             "colour kNN": {"spectrum_r2": 0.73, "z_median_sigma_mad": 0.0202}}
  epath.Path(f"{ram}/run").mkdir(parents=True)  # As training leaves it.
  table = evaluate.write_results(f"{ram}/run", results)
  stored = json.loads(tf.io.gfile.GFile(f"{ram}/run/results.json").read())
  assert stored == {"split": "test", "results": results}
  assert table in tf.io.gfile.GFile(f"{ram}/run/results.md").read() and "colour kNN" in table
