"""The DistZO2 test problem, shared by test_parallel.py and its multi-process workers.

Run as a script, it is one of the workers: ``python _distzo.py PROCESS_ID NUM_PROCESSES
PORT OUT.npz``; each process has 4 CPU devices, the mesh spans all of them, and process 0
writes the final state (unflushed weights, momentum, pending coefficients) to OUT.npz.
"""

import sys

STEPS = 3
MESH = (2, 4)
# The unit decomposition: engine settings, the same on every mesh (which only has to divide it).
# Rademacher z: packed sign words run along a leaf's last axis, and sliced streaming cuts
# leaves on their first divisible axis, so this is the direction whose slices could go wrong
# (Gaussian draws are elementwise in the key; the perturbation tests cover both).
SETTINGS = dict(branch_group=1, microbatches=4, direction="rademacher")


def problem():
  """(engine factory(layout, **settings), initial params, batch(t), key): imports jax lazily."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from zojax import optim
  from zojax.models import llama
  from zojax.zo import stream

  cfg = llama.CONFIGS["tiny"]
  model = llama.make(cfg)
  params = llama.init(cfg, jax.random.key(0))

  def batch(t):
    rng = np.random.default_rng(t)
    tokens = rng.integers(0, cfg.vocab_size, (8, 8)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1)}

  def engine(layout, **settings):
    update = optim.zo_sgd(1e-2, momentum=0.9, weight_decay=0.01)
    return stream.StreamEngine(model, update, eps=1e-3, layout=layout,
                               **{**SETTINGS, **settings})

  del jnp
  return engine, params, batch, jax.random.key(5)


def place_batch(engine, batch_np):
  """The global batch as a global array: each process fills its devices' rows from it."""
  import jax

  def place(x):
    sharding = engine.batch_sharding()
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(place, batch_np)


def run(layout, steps=STEPS, **settings):
  """Trains `steps` steps; returns (engine, state, the compiled step it ran)."""
  import jax

  engine, params, batch, key = problem()
  engine = engine(layout, **settings)
  state = engine.init(params, key)
  # Compiled ahead of time so a test can read its HLO without compiling it again.
  compiled = engine.compile(state, place_batch(engine, batch(0)))
  for t in range(steps):
    state, _ = engine.step(state, place_batch(engine, batch(t)))
    jax.block_until_ready(state)  # collectives on fake CPU devices: never run far ahead
  return engine, state, compiled


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_platforms", "cpu")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  import numpy as np
  from jax.experimental import multihost_utils

  from zojax.zo import parallel

  assert jax.device_count() == 4 * num_processes, jax.devices()
  _, state, _ = run(parallel.make_layout(*MESH))
  leaves = (state.outer, state.blocks, state.blocks_opt, state.pending.coeffs)
  flat = {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(leaves)[0]}
  gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
              for k, v in flat.items()}
  if process_id == 0:
    np.savez(out, **gathered)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
