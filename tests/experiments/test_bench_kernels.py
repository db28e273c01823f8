"""experiments/bench_kernels.py's measuring functions on tiny shapes (compile only, CPU)."""

import json
import pathlib
import runpy
import types

import pytest

# The script is not a package module: run its top level (imports, functions) without main.
bench = types.SimpleNamespace(**runpy.run_path(
    str(pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_kernels.py"),
    run_name="bench_kernels"))


def test_memory_grows_quadratically_for_naive_and_linearly_for_blockwise():
  small, large = 256, 1024
  blocks = bench.attn.BlockSizes(blockwise_block_k=32)  # several key blocks even at N=256
  table = bench.memory_table([small, large], block_sizes=blocks, heads=2, kv_heads=2,
                             head_dim=16)
  summary = bench.memory_summary(table, small, large)
  for phase in ("forward", "forward_backward"):
    naive = table["xla"][large][phase]["peak_bytes"]
    assert summary[f"xla_{phase}_peak_bytes"][str(large)] == naive
    assert naive >= 2 * large * large * 4  # the float32 [H, N, N] scores
    # [H, N, N] scores dominate the naive path; the blockwise path keeps O(N) state.
    assert summary[f"xla_{phase}_growth_exponent"] > 1.8
    assert summary[f"blockwise_{phase}_growth_exponent"] < 1.2
    assert summary[f"naive_over_blockwise_{phase}_at_{large}"] > 1.0


def test_save_writes_json_and_plot(tmp_path):
  table = bench.memory_table([64, 128], heads=1, kv_heads=1, head_dim=8)
  results = {"memory": {impl: {str(n): rows[n] for n in rows} for impl, rows in table.items()}}
  bench.save(results, tmp_path / "r.json")
  assert json.loads((tmp_path / "r.json").read_text()) == results
  assert (tmp_path / "r.png").stat().st_size > 0


def test_growth_exponent():
  assert bench.growth_exponent(10, 40, 4, 8) == pytest.approx(2.0)
  assert bench.growth_exponent(10, 20, 4, 8) == pytest.approx(1.0)
