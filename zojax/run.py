"""The one entry point: python -m zojax.run --config configs/X.py[:arg] --workdir DIR [key=value ...]."""

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
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
  try:
    config = config_lib.load(args.config)
    config_lib.override(config, args.overrides)
    config_lib.validate(config)
    from zojax.train import loop  # noqa: PLC0415  (imports JAX; keep --help and errors fast)
    results = loop.train(config, args.workdir)
  except (config_lib.ConfigError, AssetError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = {"workdir": args.workdir, "steps": results["steps"],
             "initial_eval": results["initial_eval"], "final_eval": results["final_eval"],
             "peak_step_bytes": results["step_memory"].get("peak_bytes")}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
