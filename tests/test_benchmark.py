"""The benchmark's own arithmetic: analytic FLOPs against XLA's count, the peer geometry, peaks."""

import json

import pytest

from experiments import benchmark
from experiments.configs import baseline


@pytest.mark.parametrize("embedding", ["conv2d", "conv1d", "linear"])
def test_analytic_train_flops_match_xlas_count_of_the_compiled_step(embedding):
  config = baseline.get_config("tiny")
  with config.unlocked():
    config.model.patch_embedding = embedding
    config.model.dim = 128
  timing = benchmark.time_train_step(config, steps=1)
  analytic = benchmark.train_flops(config) * config.batch_size
  # XLA also counts the elementwise work (norms, softmax, GELU, Adam) that the analytic count
  # leaves out; a missed matmul or a wrong factor would fall outside.
  assert analytic <= timing["xla_flops"] <= 1.3 * analytic
  assert timing["step_s"] > 0 and timing["loss"] > 0


def test_the_peer_counts_the_whole_last_block():
  config = baseline.get_config("seed")
  full, summary_only = (benchmark.train_flops(config, summary_only=s) for s in (False, True))
  m, d = config.model, config.model.dim
  tokens = (config.image_size // m.patch_size) ** 2 + 1 + int(m.photometry_token)
  # The last block's attention, output and MLP matmuls for the tokens other than the summary
  # (q, k and v are projected for every token either way), forward and backward (3x).
  per_token = 2 * (2 * tokens * d + d * d + 2 * d * m.mlp_ratio * d)
  assert full - summary_only == 3 * (tokens - 1) * per_token


def test_bench_config_has_the_peer_geometry_and_the_sizes_width():
  for size in ("small", "seed"):
    config = benchmark.bench_config(size, "bfloat16")
    sized = baseline.get_config(size)
    assert (config.image_size, config.model.patch_size) == (288, 16)
    assert config.model.patch_embedding == "conv1d"
    assert tuple(config.model.cnn_features) == (32, 64) and config.model.decoder_hidden == 2048
    assert config.adam_mu_dtype == "float32" and config.dtype == "bfloat16"
    assert (config.model.dim, config.model.num_layers) == (sized.model.dim,
                                                          sized.model.num_layers)


def test_peak_of_an_unknown_chip_is_measured(monkeypatch):
  monkeypatch.setattr(benchmark, "matmul_peak", lambda dtype: 123e9)
  assert benchmark.peak_flops("float32") == (123e9, "measured float32 4096^3 matmul")


def test_matmul_peak_is_a_rate():
  rate = benchmark.matmul_peak("float32", n=256, reps=1)
  assert 1e6 < rate < 1e15


def test_peer_is_skipped_with_a_reason_without_torch(monkeypatch):
  monkeypatch.setattr(benchmark, "_TORCH_PYTHON", type("F", (), {"value": ""})())
  assert benchmark.run_peer(benchmark.bench_config("small", "float32"), 1).startswith("skipped")


def test_emit_prints_one_json_line_and_the_table_lists_it(capsys):
  benchmark.FIGURES.clear()
  benchmark.emit("train step small float32", 12.5, "samples/s", 1.1, step_s=2.56)
  row = json.loads(capsys.readouterr().out)
  assert row == {"figure": "train step small float32", "value": 12.5, "unit": "samples/s",
                 "vs_torch": 1.1, "step_s": 2.56}
  assert "| train step small float32 | 12.5 | samples/s | 1.1x | step_s=2.56 |" in benchmark.table()
