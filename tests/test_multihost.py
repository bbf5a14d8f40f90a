"""Two processes x 2 CPU devices on 127.0.0.1: first start on an empty cache, each process reads
its share, a SIGTERM to one process stops both at the same step, and the rerun resumes."""

import json
import os
import re
import signal
import socket
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
from experiments.configs import baseline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, cache, log_path):
  """`experiments.baseline` (tiny config) as 2 processes of 2 CPU devices each; the default mock
  survey is generated and prepared in `cache` when it is not there yet."""
  cmd = [sys.executable, "-m", "experiments.baseline", f"--workdir={workdir}",
         f"--config={REPO}/experiments/configs/baseline.py:tiny",
         f"--config.mock_cache_dir={cache}", f"--config.num_train_steps={STEPS}",
         "--config.checkpoint_every_steps=4", f"--config.eval_every_steps={STEPS}",
         f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  for pid in range(2):
    log = open(f"{log_path}.{pid}", "a")
    procs.append(subprocess.Popen(cmd + [f"--process_id={pid}"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  return procs


def wait(procs, log_path, timeout=600):
  """The exit codes and logs of `procs`; on a timeout they are killed (never left running)."""
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return codes, [open(f"{log_path}.{pid}").read() for pid in range(len(procs))]


def train_steps_logged(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l)["step"] for l in open(path) if '"train"' in l]


def params_at(workdir, step):
  config = baseline.get_config("tiny")
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  latest, _ = checkpoint.checkpoint_managers(workdir, config)
  state = latest.restore(step, args=ocp.args.StandardRestore(
      train.abstract_state(config, model, tx, mesh)))
  return jax.device_get(state.params)


@pytest.mark.slow
def test_first_start_preemption_of_one_process_and_resume(tmp_path):
  cache = str(tmp_path / "cache")
  reference, resumed = str(tmp_path / "reference"), str(tmp_path / "resumed")

  # 1. Both processes start together on an empty cache: process 0 generates and prepares the
  #    mock survey, process 1 waits for it, and both train to the end.
  log = str(tmp_path / "reference.log")
  codes, logs = wait(launch(reference, cache, log), log)
  assert codes == [0, 0], logs[codes.index(max(codes))][-3000:]
  assert "Generating the default mock survey" in logs[0]
  assert "Generating the default mock survey" not in logs[1]
  # Each process reads its own share of the 17 training galaxies, together one epoch.
  shares = [re.search(r"reads (\d+) of the 17 'train' examples", text) for text in logs]
  assert [int(m.group(1)) for m in shares] == [9, 8], [text[-2000:] for text in logs]
  assert train_steps_logged(reference) == list(range(1, STEPS + 1))
  assert os.path.exists(os.path.join(reference, "results.md"))

  # 2. SIGTERM to process 1 only (a preempted host): both stop at the same step, save it, say
  #    so and exit 0 within a minute; no results.json (training did not finish).
  log = str(tmp_path / "resumed.log")
  procs = launch(resumed, cache, log)
  start = time.time()
  try:
    while 3 not in train_steps_logged(resumed):
      assert all(p.poll() is None for p in procs), "training ended before it was interrupted"
      assert time.time() - start < 600, "step 3 not reached in 600 s"
      time.sleep(0.02)
  except AssertionError:
    wait(procs, log, timeout=1)
    raise
  procs[1].send_signal(signal.SIGTERM)
  sent = time.time()
  codes, logs = wait(procs, log, timeout=60)
  assert time.time() - sent < 60
  assert codes == [0, 0], [text[-3000:] for text in logs]
  stops = [int(re.search(r"every process stops at step (\d+)", text).group(1)) for text in logs]
  assert stops[0] == stops[1] < STEPS
  saved = checkpoint.checkpoint_managers(resumed, baseline.get_config("tiny"))[0].latest_step()
  assert saved == stops[0]
  for text in logs:
    assert re.findall(r"Preempted at step (\d+): checkpoint saved; rerun the same command",
                      text) == [str(saved)]
  assert not os.path.exists(os.path.join(resumed, "results.json"))

  # 3. The same command resumes there and ends with the uninterrupted run's parameters.
  codes, logs = wait(launch(resumed, cache, log), log)
  assert codes == [0, 0], logs[codes.index(max(codes))][-3000:]
  assert f"Resuming from checkpoint at step {saved}" in logs[0]
  assert sorted(set(train_steps_logged(resumed))) == list(range(1, STEPS + 1))
  jax.tree.map(np.testing.assert_array_equal, params_at(resumed, STEPS),
               params_at(reference, STEPS))
  # Only process 0 writes logs: one TensorBoard writer per run.
  assert len(os.listdir(os.path.join(resumed, "tensorboard"))) == 2
