"""What the checkpoint checksums cost: `checkpoint._local_hashes` (per-element murmur3 mix,
summed shard by shard) against the whole `checkpoint.save` of a large fp32 state, and
against zlib's crc32 of the same bytes, side by side in one process, on CPU.

  .venv/bin/python experiments/checkpoint_hash.py [--gib 1.0] [--repeats 2]

Writes experiments/results/checkpoint_hash.json: seconds per pass for each (median of the
repeats), their ratios, and GiB/s.
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

  hash_s, hash_all = _timed(lambda: checkpoint._local_hashes(state), args.repeats)
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
      "seconds": {"local_hashes": hash_s, "crc32_bytes": crc_s, "save_with_checksums": save_s},
      "all_seconds": {"local_hashes": hash_all, "crc32_bytes": crc_all,
                      "save_with_checksums": save_all},
      "hash_share_of_save": hash_s / save_s,
      "hash_over_crc32": hash_s / crc_s,
      "gib_per_s": {"local_hashes": gib / hash_s, "crc32_bytes": gib / crc_s,
                    "save_with_checksums": gib / save_s},
      "note": "CPU, one process, 2 shared cores (another job running): ratios, not speeds",
  }
  RESULTS.write_text(json.dumps(out, indent=2) + "\n")
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
