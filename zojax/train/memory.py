"""Step memory read off XLA's compiled executable (deterministic, works on CPU)."""

from __future__ import annotations

FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def step_memory(compiled) -> dict[str, int]:
  """Bytes from `compiled.memory_analysis()`, device and host separately, plus the peak.

  peak = arguments + outputs + temporaries - aliased (donated buffers are counted once).
  """
  analysis = compiled.memory_analysis()
  if analysis is None:  # some backends do not implement it
    return {}
  out = {}
  for prefix in ("", "host_"):
    for field in FIELDS:
      value = getattr(analysis, f"{prefix}{field}_size_in_bytes", None)
      if value is not None:
        out[f"{prefix}{field}_bytes"] = int(value)
  out["peak_bytes"] = (out.get("argument_bytes", 0) + out.get("output_bytes", 0)
                       + out.get("temp_bytes", 0) - out.get("alias_bytes", 0))
  return out
