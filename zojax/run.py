"""The one entry point: python -m zojax.run --config configs/X.py[:arg] --workdir DIR [key=value ...].

One process, or one of many: on SLURM, Open MPI or Cloud TPU the processes find each other
on their own; elsewhere pass --coordinator_address, --num_processes and --process_id to
each (or use `python -m zojax.launch` on one machine). See `zojax.train.distributed`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from zojax.data.fetch import AssetError
from zojax.train import config as config_lib


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m zojax.run", description=__doc__)
  parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:arg")
  parser.add_argument("--workdir", required=True, help="run directory (resumes if it has checkpoints)")
  parser.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=10")
  from zojax.train import distributed  # noqa: PLC0415  (imports JAX; keep --help fast)
  distributed.add_flags(parser)
  args = parser.parse_args(argv)
  try:
    group = distributed.start(args)  # before anything else touches JAX
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # Process 0 speaks for the run; the others report errors only.
  logging.basicConfig(level=logging.INFO if group.process_id == 0 else logging.ERROR,
                      format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(  # orbax logs every file it writes
      logging.WARNING if group.process_id == 0 else logging.ERROR)
  try:
    config = config_lib.load(args.config)
    config_lib.override(config, args.overrides)
    config_lib.validate(config)
    from zojax.train import loop  # noqa: PLC0415  (imports the train stack; keep errors fast)
    results = loop.train(config, args.workdir)
  except (config_lib.ConfigError, AssetError, FloatingPointError) as e:
    return distributed.fail(str(e), 2)
  except Exception as e:  # noqa: BLE001  (many processes: the others must hear of it)
    return distributed.fail_unexpected(e)
  except KeyboardInterrupt:
    if group.num_processes == 1:
      raise
    return distributed.fail("interrupted", 130)
  try:
    distributed.finish()
  except Exception as e:  # noqa: BLE001  (a process that never reached the end)
    return distributed.fail(f"the run's processes did not finish together: {e}", 1)
  if group.process_id == 0:
    summary = {"workdir": args.workdir, "steps": results["steps"],
               "initial_eval": results["initial_eval"], "final_eval": results["final_eval"],
               "peak_step_bytes": results["step_memory"].get("peak_bytes")}
    print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
