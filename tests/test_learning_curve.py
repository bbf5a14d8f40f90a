"""experiments/learning_curve.py: two tiny points end to end, a rerun that skips them, a resume."""

import json
import os
import shutil

import numpy as np
import pytest

from astra_jax.data import prepare
from experiments import learning_curve
from experiments.configs import baseline

# mock_seed 3: 24 galaxies hash to 17/2/5 train/validation/test, 36 to 28/4/4.
SIZES = (24, 36)
KEYS = {"num_galaxies", "num_train", "num_validation", "num_test", "num_train_steps", "epochs",
        "seconds", "machine", "results", "resumed_from_step"}


def _boom(*args, **kwargs):
  raise AssertionError("a finished stage ran again")


def _lines(workdir):
  with open(os.path.join(workdir, learning_curve.JSONL)) as f:
    return f.read().splitlines()


def _checkpoints(point):
  names = os.listdir(os.path.join(point, "checkpoints"))
  return sorted((s for s in names if s.isdigit()), key=int)


@pytest.mark.slow
def test_points_finish_skip_when_done_and_resume(tmp_path, monkeypatch):
  # One process prepares the few dozen galaxies: spawning reader processes (each importing
  # TensorFlow) costs more than it saves here.
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  config = baseline.get_config("tiny")  # mock_seed 3.
  workdir, out_dir = str(tmp_path / "work"), str(tmp_path / "docs")
  run = lambda: learning_curve.learning_curve(config, workdir, SIZES, 1.0, out_dir)

  records = run()
  assert [r["num_galaxies"] for r in records] == list(SIZES)
  for r in records:
    assert KEYS <= set(r)
    assert r["num_train"] + r["num_validation"] + r["num_test"] == r["num_galaxies"]
    # 1 epoch: ceil(train galaxies / batch 8).
    assert r["num_train_steps"] == -(-r["num_train"] // config.batch_size)
    assert r["resumed_from_step"] == 0
    assert set(r["seconds"]) == {"generate", "prepare", "train_evaluate", "total"}
    assert all(v > 0 for v in r["seconds"].values())
    assert {"platform", "device_kind", "cores"} <= set(r["machine"])
    assert set(r["results"]) == {"ASTRA", "mean spectrum", "colour kNN", "photo trees",
                                 "photo MLP"}
    for scalars in r["results"].values():
      assert np.isfinite(scalars["z_median_sigma_mad"]) and np.isfinite(scalars["spectrum_r2"])
    point = os.path.join(workdir, f"n{r['num_galaxies']}")
    assert not os.path.exists(os.path.join(point, "raw"))  # Deleted once prepared.
  assert len(_lines(workdir)) == 2
  assert os.path.getsize(os.path.join(out_dir, "learning_curve.png")) > 0
  table = open(os.path.join(out_dir, "learning_curve.md")).read()
  assert "| 24 | 17 / 2 / 5 |" in table and "| ASTRA | mean spectrum |" in table

  # A rerun generates, prepares and trains nothing; it only redraws the figure and table.
  lines = _lines(workdir)
  point = os.path.join(workdir, "n36")
  steps = _checkpoints(point)
  os.remove(os.path.join(out_dir, "learning_curve.png"))
  with monkeypatch.context() as m:
    m.setattr(learning_curve.mock, "generate_survey", _boom)
    m.setattr(prepare, "prepare", _boom)
    m.setattr(learning_curve.train, "train_and_evaluate", _boom)
    run()
  assert _lines(workdir) == lines and _checkpoints(point) == steps
  assert os.path.exists(os.path.join(out_dir, "learning_curve.png"))

  # Interrupted after step 2's checkpoint: no line, no later checkpoint. It resumes training
  # from step 2 on the dataset it prepared; nothing is generated or prepared again.
  with open(os.path.join(workdir, learning_curve.JSONL), "w") as f:
    f.write(lines[0] + "\n")
  last = steps[-1]
  for folder in ("checkpoints", "best"):
    shutil.rmtree(os.path.join(point, folder, last), ignore_errors=True)
  with monkeypatch.context() as m:
    m.setattr(learning_curve.mock, "generate_survey", _boom)
    m.setattr(prepare, "prepare", _boom)
    records = run()
  assert _lines(workdir)[0] == lines[0] and len(_lines(workdir)) == 2
  before, after = json.loads(lines[1]), records[1]
  assert after["resumed_from_step"] == int(steps[-2]) and _checkpoints(point) == steps
  # Stages it did not redo keep the times recorded when they ran.
  for stage in ("generate", "prepare"):
    assert after["seconds"][stage] == before["seconds"][stage]
  assert set(after["results"]) == set(before["results"])
  metrics = [json.loads(l) for l in open(os.path.join(point, "metrics.jsonl"))]
  train_steps = [l["step"] for l in metrics if l["split"] == "train"]
  assert train_steps[-2:] == [int(steps[-2]) + 1, int(last)]


def test_table_and_figure_from_records(tmp_path):
  """Predictors missing at a point (an older dataset without the photometry) show as '–'."""
  scalars = {"z_median_sigma_mad": 0.02, "z_median_outlier_fraction": 0.01, "spectrum_r2": 0.8}
  machine = {"backend": "gpu", "device_kind": "NVIDIA H100", "device_count": 1, "cores": 16,
             "processor": "x86_64", "platform": "Linux"}
  records = [
      {"num_galaxies": n, "num_train": 8 * n // 10, "num_validation": n // 10,
       "num_test": n // 10, "num_train_steps": 3 * n // 10, "seconds": {"total": 90.0 * k},
       "machine": machine, "results": {"ASTRA": scalars, "colour kNN": scalars,
                                       **({"photo MLP": scalars} if k else {})}}
      for k, n in enumerate((2000, 8000))]
  table = learning_curve.markdown_table(records)
  assert "| ASTRA | colour kNN | photo MLP |" in table
  cells = "0.02 / 0.01 / 0.8"
  assert f"| 2000 | 1600 / 200 / 200 | {cells} | {cells} | – / – / – |" in table
  assert "1.5 min | NVIDIA H100 x1, 16 cores |" in table
  path = learning_curve.plot(records, str(tmp_path / "curve.png"))
  assert os.path.getsize(path) > 0
