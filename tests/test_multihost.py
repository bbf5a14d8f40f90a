"""Two processes x 2 CPU devices on 127.0.0.1 train like one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from astra_jax import checkpoint
from astra_jax import sharding
from astra_jax import train
from experiments.configs import baseline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(workdir, dataset_dir, steps, num_processes, log_path):
  """`experiments.baseline` on `num_processes` local processes sharing 4 CPU devices."""
  cmd = [sys.executable, "-m", "experiments.baseline", f"--workdir={workdir}",
         f"--config={REPO}/experiments/configs/baseline.py:tiny",
         f"--config.data_dir={dataset_dir}", f"--config.num_train_steps={steps}"]
  port = free_port()
  procs = []
  for pid in range(num_processes):
    env = dict(os.environ, PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // num_processes}")
    if num_processes > 1:
      cmd_p = cmd + [f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={num_processes}", f"--process_id={pid}"]
    else:
      cmd_p = cmd
    log = open(f"{log_path}.{pid}", "a")
    procs.append(subprocess.Popen(cmd_p, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  codes = [p.wait(timeout=900) for p in procs]
  assert codes == [0] * num_processes, open(f"{log_path}.{codes.index(max(codes))}").read()[-3000:]


def params_at(workdir, step):
  config = baseline.get_config("tiny")
  mesh = sharding.create_mesh()
  model, tx = train.make_model(config), train.make_optimizer(config)
  latest, _ = checkpoint.checkpoint_managers(workdir, config)
  state = latest.restore(step, args=ocp.args.StandardRestore(
      train.abstract_state(config, model, tx, mesh)))
  return jax.device_get(state.params)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume(tiny_dataset, tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  # 4 steps, then the same command with 6 (a new cosine schedule): both runs share that history.
  for steps in (4, 6):
    run(multi, tiny_dataset, steps, 2, str(tmp_path / "multi.log"))   # 2nd: multi-process restore.
    run(single, tiny_dataset, steps, 1, str(tmp_path / "single.log"))
  assert "Resuming from checkpoint at step 4" in open(tmp_path / "multi.log.0").read()

  # The same global batches and dropout masks on the same 4 devices; only the all-reduce crosses
  # processes (gloo), so float32 sums may run in another order: tolerance 1e-5 relative on the
  # losses and gradient norms. On parameters: 99% within 1e-5, all within 3e-4 (Adam's first steps
  # are ~lr*sign(g) with lr = 1e-3, which turns summation-order noise in the few gradients that
  # cancel to ~0 into differences of a fraction of lr).
  train_lines = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))
                           if '"train"' in l]
  for a, b in zip(train_lines(multi), train_lines(single), strict=True):
    assert a["step"] == b["step"]
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)
  got, expected = params_at(multi, 6), params_at(single, 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=3e-4), got, expected)
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                         for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))])
  assert np.mean(diff > 1e-5) < 0.01, np.mean(diff > 1e-5)

  # Only process 0 writes logs: each step once, one TensorBoard writer per run.
  steps = [json.loads(l)["step"] for l in open(os.path.join(multi, "metrics.jsonl"))
           if '"train"' in l]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert len(os.listdir(os.path.join(multi, "tensorboard"))) == 2
  assert os.path.exists(os.path.join(multi, "results.md"))
