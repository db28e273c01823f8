"""What the checkpoint checksums cost: `checkpoint._local_hashes` (per-element murmur3 mix,
summed shard by shard; now one jitted pass per shard on its device) against the numpy
reference it replaced (`checkpoint._block_hash` of each shard copied to the host, the
definition), the whole `checkpoint.save` of a large fp32 state, and zlib's crc32 of the same
bytes, side by side in one process, on CPU.

  .venv/bin/python experiments/checkpoint_hash.py [--gib 1.0] [--repeats 2]

Writes experiments/results/checkpoint_hash.json: seconds per pass for each (median of the
repeats; the jitted hash's compile is timed apart), their ratios, and GiB/s.
"""

import argparse
import json
import pathlib
import statistics
import tempfile
import time
import zlib

import jax
import numpy as np

from zojax.train import checkpoint

RESULTS = pathlib.Path(__file__).parent / "results" / "checkpoint_hash.json"


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def _reference_local_hashes(state):
  """The numpy path `_local_hashes` had before: every replica-0 shard copied to the host
  and hashed there."""
  return [sum(checkpoint._block_hash(np.asarray(s.data), s.index, x.shape)
              for s in x.addressable_shards if s.replica_id == 0) % 2**32
          for x in jax.tree.leaves(state)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--gib", type=float, default=1.0, help="state size in GiB of float32")
  parser.add_argument("--leaves", type=int, default=8, help="arrays the state is cut into")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  n = int(args.gib * 2**30 / 4 / args.leaves) // 1024 * 1024
  rng = np.random.default_rng(0)
  state = {f"w{i}": jax.device_put(rng.standard_normal((n // 1024, 1024), np.float32))
           for i in range(args.leaves)}
  gib = args.leaves * n * 4 / 2**30
  host = [np.asarray(x) for x in state.values()]

  t = time.perf_counter()
  device = [int(h) for h in checkpoint._local_hashes(state)]  # compiles: timed apart
  first_s = time.perf_counter() - t
  reference = _reference_local_hashes(state)
  assert device == reference, (device, reference)
  hash_s, hash_all = _timed(lambda: checkpoint._local_hashes(state), args.repeats)
  ref_s, ref_all = _timed(lambda: _reference_local_hashes(state), args.repeats)
  crc_s, crc_all = _timed(lambda: [zlib.crc32(memoryview(x).cast("B")) for x in host],
                          args.repeats)
  with tempfile.TemporaryDirectory() as d:
    mngr = checkpoint.manager(pathlib.Path(d), keep=1)
    steps = iter(range(1, 100))
    save_s, save_all = _timed(lambda: checkpoint.save(mngr, next(steps), state, {}),
                              args.repeats)
    mngr.close()
  out = {
      "state_gib": round(gib, 3), "leaves": args.leaves, "devices": jax.device_count(),
      "repeats": args.repeats,
      "hashes_equal_reference": device == reference,
      "seconds": {"local_hashes": hash_s, "numpy_reference": ref_s, "crc32_bytes": crc_s,
                  "save_with_checksums": save_s, "local_hashes_first_call": first_s},
      "all_seconds": {"local_hashes": hash_all, "numpy_reference": ref_all,
                      "crc32_bytes": crc_all, "save_with_checksums": save_all},
      "reference_over_local_hashes": ref_s / hash_s,
      "hash_share_of_save": hash_s / save_s,
      "hash_over_crc32": hash_s / crc_s,
      "reference_over_crc32": ref_s / crc_s,
      "gib_per_s": {"local_hashes": gib / hash_s, "numpy_reference": gib / ref_s,
                    "crc32_bytes": gib / crc_s, "save_with_checksums": gib / save_s},
      "note": ("CPU, one process, 2 shared cores (another job running): ratios, not speeds. "
               "local_hashes is the jitted device hash; numpy_reference the numpy path it "
               "replaced (identical values, checked); save includes local_hashes"),
  }
  RESULTS.write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))
  print(json.dumps({"reference_over_local_hashes": round(ref_s / hash_s, 1),
                    "hash_share_of_save": round(hash_s / save_s, 3),
                    "hash_over_crc32": round(hash_s / crc_s, 2)}))


if __name__ == "__main__":
  main()
