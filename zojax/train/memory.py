"""Step memory read off XLA's compiled executable (deterministic, works on CPU).

One formula for every engine: peak = arguments + outputs + temporaries − aliased (a donated
buffer that becomes an output is counted once). `step_memory` applies it to XLA's own
totals; `zojax.zo.inspect.device_bytes` applies it to device and host memory apart.
"""

from __future__ import annotations

FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def peak(argument: int, output: int, temp: int, alias: int) -> int:
  """Bytes live at once while a step runs: arguments + outputs + temporaries − aliased."""
  return argument + output + temp - alias


def step_memory(compiled) -> dict[str, int]:
  """Bytes from `compiled.memory_analysis()`, device and host separately, plus the peak.

  Returns:
    ``{prefix}{field}_bytes`` for every field XLA reports (prefix "" or "host_"), and
    ``peak_bytes`` by `peak`; empty when the backend has no memory analysis.
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
  out["peak_bytes"] = peak(out.get("argument_bytes", 0), out.get("output_bytes", 0),
                           out.get("temp_bytes", 0), out.get("alias_bytes", 0))
  return out
