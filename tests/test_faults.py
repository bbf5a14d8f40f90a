"""Faults: kill -9 and SIGTERM mid-training, a save killed half-way, corrupt shards, bad configs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from astra_jax import checkpoint
from astra_jax import sharding
from astra_jax import train
from astra_jax.data import pipeline
from experiments.configs import baseline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def launch(workdir, dataset_dir, log):
  """`python -m experiments.baseline` on the tiny config, as a user would run it."""
  cmd = [sys.executable, "-m", "experiments.baseline", f"--workdir={workdir}",
         f"--config={REPO}/experiments/configs/baseline.py:tiny",
         f"--config.data_dir={dataset_dir}", f"--config.num_train_steps={STEPS}",
         "--config.checkpoint_every_steps=4", f"--config.eval_every_steps={STEPS}"]
  return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          stdout=log, stderr=subprocess.STDOUT)


def train_steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l)["step"] for l in open(path) if '"train"' in l]


def interrupt_at(proc, workdir, step, signum, timeout=300):
  """Sends `signum` once this run has logged `step`; returns the process's exit code."""
  earlier = len(train_steps_logged(workdir))      # Lines that runs before this one wrote.
  start = time.time()
  while step not in train_steps_logged(workdir)[earlier:]:
    assert proc.poll() is None, "training ended before it could be interrupted"
    assert time.time() - start < timeout
    time.sleep(0.02)
  proc.send_signal(signum)
  return proc.wait(timeout=timeout)


def final_params(workdir):
  config = baseline.get_config("tiny")
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  latest, _ = checkpoint.checkpoint_managers(workdir, config)
  assert latest.latest_step() == STEPS
  state = latest.restore(STEPS, args=ocp.args.StandardRestore(
      train.abstract_state(config, model, tx, mesh)))
  return jax.device_get(state.params)


@pytest.mark.slow
def test_kill9_sigterm_and_a_killed_save_resume_bitwise(tiny_dataset, tmp_path):
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")
  with open(tmp_path / "reference.log", "w") as log:
    assert launch(reference, tiny_dataset, log).wait(timeout=600) == 0

  log = open(tmp_path / "resumed.log", "w")
  # 1. kill -9 at an arbitrary step after the first checkpoints (saves run in the background,
  #    so the latest complete one can be 4 or 8).
  assert interrupt_at(launch(resumed, tiny_dataset, log), resumed, 10, signal.SIGKILL) == -9
  latest = checkpoint.checkpoint_managers(resumed, baseline.get_config("tiny"))[0]
  killed_at = latest.latest_step()
  assert killed_at in (4, 8)

  # 2. SIGTERM: a checkpoint of the step it stopped at, one line saying so, then exit 0 (it
  #    stopped as told); no results.json, since training did not finish.
  proc = launch(resumed, tiny_dataset, log)
  assert interrupt_at(proc, resumed, killed_at + 5, signal.SIGTERM) == 0
  latest = checkpoint.checkpoint_managers(resumed, baseline.get_config("tiny"))[0]
  termed_at = latest.latest_step()
  assert termed_at >= killed_at + 5
  stopped = re.findall(r"Preempted at step (\d+): checkpoint saved; rerun the same command to "
                       r"resume", open(tmp_path / "resumed.log").read())
  assert stopped == [str(termed_at)]
  assert not os.path.exists(os.path.join(resumed, "results.json"))

  # 3. A save killed half-way leaves Orbax's temporary folder: the next run ignores it, says so,
  #    and resumes from the last complete checkpoint.
  ckpt = os.path.join(resumed, "checkpoints")
  shutil.copytree(os.path.join(ckpt, str(termed_at)),
                  os.path.join(ckpt, f"{STEPS - 1}.orbax-checkpoint-tmp-1234"))
  for root, _, files in os.walk(os.path.join(ckpt, f"{STEPS - 1}.orbax-checkpoint-tmp-1234")):
    for name in files[: len(files) // 2]:
      os.remove(os.path.join(root, name))
  assert launch(resumed, tiny_dataset, log).wait(timeout=600) == 0
  log.close()
  output = open(tmp_path / "resumed.log").read()
  assert "Ignoring incomplete checkpoint(s) 23.orbax-checkpoint-tmp-1234" in output
  assert f"resuming from step {termed_at}" in output
  assert os.path.exists(os.path.join(resumed, "results.json"))

  # The interrupted run ends with exactly the parameters of the uninterrupted one.
  expected, got = final_params(reference), final_params(resumed)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert sorted(set(train_steps_logged(resumed))) == list(range(1, STEPS + 1))


def _corrupt_copy(dataset_dir, tmp_path, damage):
  copy = str(tmp_path / "copy")
  shutil.copytree(dataset_dir, copy)
  (shard,) = [os.path.join(copy, f) for f in os.listdir(copy) if "train.tfrecord" in f]
  data = bytearray(open(shard, "rb").read())
  open(shard, "wb").write(damage(data))
  return copy, shard


@pytest.mark.parametrize("damage", [
    lambda d: d[: len(d) // 2],                                          # Truncated.
    lambda d: d[:5000] + bytes(b ^ 0xFF for b in d[5000:5100]) + d[5100:],  # Flipped bytes.
], ids=["truncated", "flipped"])
def test_corrupt_shard_fails_naming_the_file(tiny_dataset, tmp_path, damage):
  copy, shard = _corrupt_copy(tiny_dataset, tmp_path, damage)
  assert [path for path, _ in pipeline.check_shards(copy, "train")] == [shard]
  ds = pipeline.train_dataset(copy, global_batch=4, seed=0, process_index=0, process_count=1)
  with pytest.raises(pipeline.CorruptShardError, match=shard):
    for _ in zip(range(20), pipeline.as_numpy(ds, copy, "train")):
      pass


def test_missing_shard_fails_naming_the_file(tiny_dataset, tmp_path):
  copy, shard = _corrupt_copy(tiny_dataset, tmp_path, lambda d: d)
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=shard):
    pipeline.train_dataset(copy, global_batch=4, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("field,value,allowed", [
    ("dtype", "float16", "'float32', 'bfloat16'"),
    ("image_size", 100, "a divisor of 288"),
    ("rng_impl", "philox", "'threefry2x32', 'rbg', 'unsafe_rbg'"),
    ("bands", "g,g,r", "distinct band letters"),
])
def test_invalid_config_value_names_field_and_allowed_values(field, value, allowed):
  config = baseline.get_config("tiny")
  config[field] = value
  with pytest.raises(ValueError, match=rf"config\.{field}=.*invalid.*{allowed}"):
    train.validate_config(config)


def test_unknown_config_variant_names_the_allowed_ones():
  with pytest.raises(ValueError, match=r"'huge' is not one of \('small', 'seed', 'tiny'\)"):
    baseline.get_config("huge")
