"""DistZO2 on 8 fake CPU devices: identical trajectories across meshes, HLO-proven traffic,
2 processes x 4 devices, bad input."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _distzo
from zojax.zo import parallel, stream

MESHES = [(1, 1), (2, 1), (1, 4), (2, 4)]


def _flat(engine, state, compiled):
  # Unflushed: blocks at θ_t plus the pending estimate (flushing would cost a compile each).
  del engine, compiled
  leaves = (state.outer, state.blocks, state.blocks_opt, state.pending.coeffs)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(leaves))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


# One xdist worker runs the whole module (make test: --dist loadgroup), so its module
# fixture compiles once, not once per worker.
pytestmark = pytest.mark.xdist_group("parallel")


@pytest.fixture(scope="module")
def runs():
  # make_layout's defaults on every mesh; one engine config (`_distzo.SETTINGS`) for all.
  out = {}
  for shape in MESHES:
    out[shape] = _distzo.run(parallel.make_layout(*shape))
  return out


def test_trajectory_identical_across_mesh_shapes(runs):
  ref = _flat(*runs[(1, 1)])
  _, params0, _, _ = _distzo.problem()
  for shape in MESHES[1:]:
    got = _flat(*runs[shape])
    assert got.keys() == ref.keys()
    for name in ref:
      assert got[name].tobytes() == ref[name].tobytes(), (shape, name)
  # A control: the decomposition a (1, 1) mesh used to derive for itself (both branches of a
  # sample in one unit, the batch in one chunk) takes another trajectory, which the
  # comparison above sees.
  other = _flat(*_distzo.run(parallel.make_layout(1, 1), branch_group=2, microbatches=1))
  assert any(other[name].tobytes() != ref[name].tobytes() for name in ref)
  # The runs did train: the weights moved from their initial values.
  assert not np.array_equal(np.asarray(params0["blocks"]["wq"]), ref["[1]['wq']"])
  # Sliced streaming on (2, 4): each device holds 1/8 of every block leaf in host memory.
  wq = runs[(2, 4)][1].blocks["wq"]
  assert wq.sharding.memory_kind == "pinned_host"
  assert wq.addressable_shards[0].data.shape == (2, 64 // 8, 64)


def _collectives(engine, state, batch):
  return parallel.collective_traffic(engine.lower(state, batch).compile().as_text())


def test_collectives_are_loss_scalars_and_block_gathers(runs):
  _, _, compiled = runs[(2, 4)]  # the step the run compiled: its HLO, no second compile
  _, params0, batch, _ = _distzo.problem()
  batch0 = jax.tree.map(jnp.asarray, batch(0))
  one_layer = {jax.ShapeDtypeStruct(a.shape[1:], a.dtype).shape
               for a in jax.tree.leaves(params0["blocks"])}
  num_leaves = len(jax.tree.leaves(params0["blocks"]))
  units = 2 * 1 * _distzo.SETTINGS["microbatches"]  # 2 branches x 4 chunks, 1 sample
  sliced = parallel.collective_traffic(compiled.as_text())
  assert sliced, "the sliced (2, 4) step has no collectives: the parser or the engine is wrong"
  loss_bytes = block_gathers = 0
  for c in sliced:
    assert c["op"] == "all-gather", c  # no all-reduce, all-to-all, permute ...
    shapes = {s for _, s in c["shapes"]}
    if shapes <= one_layer:
      block_gathers += 1          # a block leaf, gathered on device
    else:
      assert c["bytes"] <= 4 * 2 * units, c  # loss scalars only: (loss_sum, count) per unit
      loss_bytes += c["bytes"]
  assert block_gathers == num_leaves  # each block leaf gathered once per visit (scan body)
  assert 0 < loss_bytes <= 4 * 2 * units * 2

  # Without slicing every device moves whole blocks: only the loss scalars cross devices.
  engine2 = _distzo.problem()[0](parallel.make_layout(2, 4, slice_blocks=False))
  whole = _collectives(engine2, engine2.abstract_state(params0, jax.random.key(5)), batch0)
  assert whole and all(c["op"] == "all-gather" and c["bytes"] <= 4 * 2 * units for c in whole)
  assert not any({s for _, s in c["shapes"]} <= one_layer for c in whole)


def test_collective_parser_sees_a_psum():
  # A control: the parser must find the all-reduce in a program that has one.
  mesh = parallel.make_mesh(1, 8)
  f = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "data"), mesh=mesh,
                            in_specs=jax.sharding.PartitionSpec("data"),
                            out_specs=jax.sharding.PartitionSpec()))
  found = parallel.collective_traffic(f.lower(jnp.ones((8, 3))).compile().as_text())
  assert [c["op"] for c in found] == ["all-reduce"] and found[0]["bytes"] == 12


def test_bad_input_names_the_setting():
  with pytest.raises(ValueError, match=r"mesh shape \(pert=3, data=1\).*does not divide"):
    parallel.make_layout(3, 1)
  engine, params, _, _ = _distzo.problem()
  with pytest.raises(ValueError, match="pert axis size 4 is larger than 2 x num_samples"):
    engine(parallel.make_layout(4, 1))
  with pytest.raises(ValueError, match=r"^mesh data axis size 4 must divide microbatches=2 "):
    engine(parallel.make_layout(1, 4), microbatches=2)
  # The engine's defaults (branch_group=2, microbatches=1) are the same on every mesh: a mesh
  # they do not fit is refused in one line, never given a decomposition of its own.
  with pytest.raises(ValueError, match=r"^mesh pert axis size 2 must divide the 1 branch "
                     r"groups \(2 x num_samples with num_samples=1, branch_group=2\)$"):
    stream.StreamEngine(*_model_and_update(), layout=parallel.make_layout(2, 4))
  with pytest.raises(ValueError, match=r"^mesh data axis size 4 must divide microbatches=1 "):
    stream.StreamEngine(*_model_and_update(), layout=parallel.make_layout(1, 4))
  with pytest.raises(ValueError, match="memory_kind='device' is not a host memory kind"):
    stream.StreamEngine(*_model_and_update(), memory_kind="device")
  with pytest.raises(ValueError, match="memory_kind='pinned_hots' is not a host memory kind"):
    stream.StreamEngine(*_model_and_update(), memory_kind="pinned_hots")
  del params


def _model_and_update():
  from zojax import optim
  from zojax.models import llama
  return llama.make(llama.CONFIGS["tiny"]), optim.zo_sgd(1e-2)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(runs, tmp_path):
  out = tmp_path / "params.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  script = pathlib.Path(_distzo.__file__)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", str(port), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
  got = dict(np.load(out))
  ref = _flat(*runs[(2, 4)])
  assert got.keys() == ref.keys()
  for name in ref:
    assert got[name].tobytes() == ref[name].tobytes(), name
