"""Checks on a streamed step's compiled program and jaxpr: memory by kind, device values,
transfer overlap. Used by tests and benchmarks; the engine itself never calls them.

Memory on CPU. XLA's CPU ``memory_analysis`` counts pinned-host arguments as ordinary
argument bytes and compiles host<->device moves away, so `device_bytes` reads the memory kind
of every argument and output from the compiled shardings; `device_values` walks the jaxpr so a
test can check that no value in device memory is larger than one block. On GPU/TPU
``memory_analysis`` separates host from device itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from zojax.train import memory

HOST_KINDS = ("pinned_host", "unpinned_host")


def nbytes(shape, dtype) -> int:
  return math.prod(shape) * np.dtype(dtype).itemsize


def _is_host(sharding) -> bool:
  return (getattr(sharding, "memory_kind", None) or "device") in HOST_KINDS


def device_bytes(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step, device and host memory apart.

  Each argument and output is sized by its shard shape and placed by the memory kind of its
  compiled sharding; temporaries and aliasing come from `memory_analysis`. Both memories use
  `zojax.train.memory.peak` (arguments + outputs + temporaries − aliased). Where the analysis
  counts host buffers as device ones (CPU), the aliased host bytes are taken to be all donated
  host arguments, so the device figure never under-counts (the streamed engine donates no
  host buffer).

  Returns:
    ``{device,host}_{argument,output,alias}_bytes``, ``temp_bytes``, ``host_temp_bytes``,
    ``device_bytes`` and ``host_bytes`` (each memory's peak).
  """
  out = {f"{place}_{what}_bytes": 0 for place in ("device", "host")
         for what in ("argument", "output")}
  donated_host = 0
  for what, infos, shardings in (
      ("argument", compiled.args_info, compiled.input_shardings[0]),
      ("output", compiled.out_info, compiled.output_shardings)):
    infos, shardings = jax.tree.leaves(infos), jax.tree.leaves(shardings)
    if len(infos) != len(shardings):
      raise ValueError(f"{len(infos)} {what}s but {len(shardings)} shardings")
    for info, sh in zip(infos, shardings):
      size = nbytes(sh.shard_shape(info.shape), info.dtype)
      out[f"{'host' if _is_host(sh) else 'device'}_{what}_bytes"] += size
      donated_host += size if _is_host(sh) and getattr(info, "donated", False) else 0
  analysis = memory.step_memory(compiled)
  alias = analysis.get("alias_bytes", 0)
  lumped = out["host_argument_bytes"] and not analysis.get("host_argument_bytes")
  host_alias = min(alias, donated_host) if lumped else analysis.get("host_alias_bytes", 0)
  out.update(temp_bytes=analysis.get("temp_bytes", 0),
             host_temp_bytes=analysis.get("host_temp_bytes", 0),
             device_alias_bytes=alias - host_alias if lumped else alias,
             host_alias_bytes=host_alias)
  out["device_bytes"] = memory.peak(out["device_argument_bytes"], out["device_output_bytes"],
                                    out["temp_bytes"], out["device_alias_bytes"])
  out["host_bytes"] = memory.peak(out["host_argument_bytes"], out["host_output_bytes"],
                                  out["host_temp_bytes"], out["host_alias_bytes"])
  return out


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def _on_host(var) -> bool:
  return getattr(var.aval, "memory_space", None) == jax.memory.Space.Host


def device_values(jaxpr) -> list[tuple[int, str]]:
  """(bytes, description) of every value in device memory space, sub-jaxprs included."""
  found = []

  def visit(jaxpr, where):
    for var in list(jaxpr.invars) + list(jaxpr.constvars):
      add(var, f"{where} input")
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        add(var, f"{where}/{eqn.primitive.name}")
      for sub in _sub_jaxprs(eqn):
        visit(sub, f"{where}/{eqn.primitive.name}")

  def add(var, what):
    aval = var.aval
    if not hasattr(aval, "shape") or not hasattr(aval, "dtype") or _on_host(var):
      return
    if jnp.issubdtype(aval.dtype, jax.dtypes.prng_key):
      return
    found.append((nbytes(aval.shape, aval.dtype), f"{what} {aval.str_short()}"))

  visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr, "step")
  return found


def transfer_overlaps(jaxpr) -> bool:
  """True when, in every scan body that copies host->device, no copy depends on a value the
  body computes from the block on device: the prefetch can run while the block computes."""
  found = False

  def check(body) -> bool:
    nonlocal found
    # Values derived only from host inputs, constants and the loop index.
    pure = {v for v in body.invars if _on_host(v)} | {
        v for v in body.invars if not hasattr(v.aval, "shape") or v.aval.shape == ()}
    ok = True
    for eqn in body.eqns:
      ins = [v for v in eqn.invars if isinstance(v, jcore.Var)]
      if all(v in pure for v in ins):
        pure.update(eqn.outvars)
      if eqn.primitive.name == "device_put":
        if any(_on_host(v) for v in ins) and any(not _on_host(v) for v in eqn.outvars):
          found = True
          ok &= all(v in pure for v in ins)
    return ok

  def visit(jaxpr) -> bool:
    ok = True
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        ok &= check(eqn.params["jaxpr"].jaxpr)
      for sub in _sub_jaxprs(eqn):
        ok &= visit(sub)
    return ok

  ok = visit(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
  return ok and found


__all__ = ["HOST_KINDS", "device_bytes", "device_values", "nbytes", "transfer_overlaps"]
