"""DistZO2 on a `jax.sharding.Mesh`: perturbation parallelism, scalar data parallelism, both.

A ZO step's work is 2n SPSA branches (n samples, ±ε) on one batch. On a mesh with axes
``("pert", "data")`` (DistZO2, Wang et al. 2025):

  * **PertP**: the branches are spread over ``pert``; each device runs its branches through
    every block (z drawn locally from the perturbation stream).
  * **DDP**: the batch is split over ``data``; each device runs every branch on its part.
  * **2D**: both. In every mode only loss scalars cross devices: an all-gather of each unit's
    (loss_sum, count), after which every device forms the same n coefficients and applies
    the same update to its copy, or its slice, of the weights.
  * **Sliced streaming** (``slice_blocks=True``): each device keeps 1/N of every block (and
    its optimizer state) in host memory, moves only that slice, all-gathers the block on
    device, and updates and writes back only its slice, drawing z for the slice alone.

The engine is `zojax.zo.stream.StreamEngine` with a `Layout` from `make_layout`. The layout
is placement only. Results depend on the engine's unit decomposition (``branch_group``,
``microbatches``: settings of the engine with mesh-independent defaults, checked against the
mesh in one line), never on the mesh shape: with ``branch_group=1, microbatches=4``, meshes
(1,1), (2,1), (1,4) and (2,4) give bit-identical trajectories (tested), as do 2 processes x
4 devices.

`collective_traffic` reads the compiled HLO and lists every collective with its bytes, so a
test can prove which values cross devices.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh

from zojax.zo.spsa import _check_count
from zojax.zo.stream import DATA, PERT, Layout


def make_mesh(pert: int, data: int, devices=None) -> Mesh:
  """A ("pert", "data") mesh of Auto axes over the first pert*data of `devices`.

  Auto (not Explicit) axis types: the engine places arrays with sharding constraints and
  shard_map, which Explicit axes reject.
  """
  devices = list(jax.devices() if devices is None else devices)
  _check_count("pert", pert)
  _check_count("data", data)
  if len(devices) % (pert * data):
    raise ValueError(f"mesh shape (pert={pert}, data={data}) = {pert * data} devices does not "
                     f"divide the {len(devices)} devices")
  grid = np.array(devices[:pert * data], dtype=object).reshape(pert, data)
  return Mesh(grid, (PERT, DATA), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_layout(pert: int = 1, data: int = 1, *, slice_blocks: bool = True,
                devices=None) -> Layout:
  """A `Layout` for a (pert, data) mesh.

  Args:
    pert: devices along the branch axis.
    data: devices along the batch axis.
    slice_blocks: DistZO2 sliced streaming (each device moves 1/N of a block).
    devices: the devices (default all, across processes).

  Returns:
    The layout; pass it to `StreamEngine(..., layout=...)` together with a decomposition
    (``branch_group``, ``microbatches``) that the mesh divides.
  """
  return Layout(make_mesh(pert, data, devices), slice_blocks=slice_blocks)


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast", "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(_COLLECTIVES)
                 + r")(?:-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")


def collective_traffic(hlo_text: str) -> list[dict]:
  """Every collective in compiled HLO text: {"op", "shapes", "bytes"} (result bytes).

  Async pairs count once (the ``-start``); ``-done`` lines are skipped. Result bytes are
  the per-device output of the collective (for an all-gather, the gathered size).
  """
  found = []
  for line in hlo_text.splitlines():
    # Long tuples carry "/*index=5*/" comments, whose "=" would cut the result shape short.
    line = _COMMENT.sub("", line)
    match = _OP.search(line)
    if not match or "-done" in line.split("=", 1)[1].split("(", 1)[0]:
      continue
    shapes = [(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
              for m in _ARRAY.finditer(match["shape"])]
    # An async start returns (operands, results, ...): count the results half only.
    if line.split("=", 1)[1].split("(", 1)[0].strip().endswith("-start") and len(shapes) > 1:
      shapes = shapes[len(shapes) // 2:]
    nbytes = sum(_BYTES.get(d, 4) * int(np.prod(s)) for d, s in shapes)
    found.append({"op": match["op"], "shapes": shapes, "bytes": nbytes})
  return found


__all__ = ["collective_traffic", "make_layout", "make_mesh"]
