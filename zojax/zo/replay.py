"""A ZO run as a log of scalars, and its bit-exact replay from the initial weights.

A ZO step's whole effect on the weights is its `ZOGrad`: the base key, the step, n
coefficients and the direction (Gaussian or Rademacher z). `ZOLog` keeps them (a few bytes
a step, JSON; one direction per log), and
`replay` re-runs only the optimizer updates, never a forward pass, to rebuild the final
parameters and optimizer state.

Bit-exactness needs the same compiled update in the run and in the replay: apply updates
with the function `make_apply(tx)` returns (not fused into a jitted train step, where XLA
may schedule the float ops differently), and log every step, skipped ones included.

  apply = zo.make_apply(tx)
  log = zo.ZOLog.start(key)
  for t in range(steps):
    loss, g = estimate(params, batch(t), key, t)     # jitted zo.spsa
    params, opt_state = apply(params, opt_state, g)
    log.append(g)
  same_params, _ = zo.replay(initial_params, log, tx)
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zojax.zo import perturb
from zojax.zo.spsa import ZOGrad


def _encode(x: float):
  return x if math.isfinite(x) else repr(x)  # strict JSON: "nan", "inf", "-inf" as strings


@dataclasses.dataclass
class ZOLog:
  """Every step's (step, coeffs, finite) plus the base key and direction: enough to replay
  a run. Logs written before directions existed have no ``direction`` and load as Gaussian."""

  key: list[int]  # uint32 key data of the base key
  impl: str = perturb.IMPL
  direction: str = "gaussian"
  steps: list[int] = dataclasses.field(default_factory=list)
  coeffs: list[list[float]] = dataclasses.field(default_factory=list)
  finite: list[bool] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    perturb.check_direction(self.direction)

  @classmethod
  def start(cls, key, direction: str = "gaussian") -> ZOLog:
    """An empty log for a run with base key `key` (typed or raw data) drawing `direction` z."""
    return cls(key=[int(k) for k in np.asarray(perturb.key_data(key))], direction=direction)

  def append(self, zograd: ZOGrad) -> None:
    """Records one step (fetches its few scalars to the host)."""
    g = jax.device_get(zograd)
    if [int(k) for k in np.asarray(g.key)] != self.key:
      raise ValueError(f"zograd.key={np.asarray(g.key).tolist()} is not this log's key {self.key}")
    if g.direction != self.direction:
      raise ValueError(f"zograd.direction={g.direction!r} is not this log's direction "
                       f"{self.direction!r}")
    self.steps.append(int(g.step))
    # float32 -> Python float is exact, and JSON keeps a float's repr exactly.
    self.coeffs.append([float(c) for c in np.asarray(g.coeffs, np.float32)])
    self.finite.append(bool(g.finite))

  def __len__(self) -> int:
    return len(self.steps)

  def zograd(self, i: int) -> ZOGrad:
    """Entry i as the `ZOGrad` the run applied."""
    return ZOGrad(key=jnp.asarray(np.asarray(self.key, np.uint32)),
                  step=jnp.asarray(self.steps[i], jnp.int32),
                  coeffs=jnp.asarray(np.asarray(self.coeffs[i], np.float32)),
                  finite=jnp.asarray(self.finite[i]), direction=self.direction)

  def to_json(self) -> str:
    record = dataclasses.asdict(self)
    record["coeffs"] = [[_encode(c) for c in row] for row in self.coeffs]
    return json.dumps(record, separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str) -> ZOLog:
    record = json.loads(text)
    record["coeffs"] = [[float(c) for c in row] for row in record["coeffs"]]
    log = cls(**record)
    if log.impl != perturb.IMPL:
      raise ValueError(f"log impl={log.impl!r}: this zojax regenerates z with {perturb.IMPL!r}")
    return log

  def save(self, path) -> None:
    pathlib.Path(path).write_text(self.to_json())

  @classmethod
  def load(cls, path) -> ZOLog:
    return cls.from_json(pathlib.Path(path).read_text())


def make_apply(tx: optax.GradientTransformation, *, donate: bool = False) -> Callable:
  """The jitted update ``(params, opt_state, zograd) -> (params, opt_state)``.

  Use the same returned function for training and `replay` to get bit-identical results.

  Args:
    tx: a transform consuming `ZOGrad`s (e.g. `zojax.optim.zo_sgd`).
    donate: donate params and opt_state buffers (in-place update).

  Returns:
    The jitted function.
  """

  def apply(params, opt_state, zograd):
    updates, opt_state = tx.update(zograd, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(apply, donate_argnums=(0, 1) if donate else ())


def replay(initial_params: Any, log: ZOLog, tx: optax.GradientTransformation, *,
           apply: Callable | None = None):
  """Re-runs a logged ZO run's updates from its initial parameters (no forward passes).

  Args:
    initial_params: the parameters the run started from.
    log: the run's `ZOLog`.
    tx: the run's optimizer (same hyperparameters and schedules).
    apply: the run's `make_apply(tx)` function; built here when None (same compilation).

  Returns:
    (params, opt_state) after the last logged step.
  """
  apply = make_apply(tx) if apply is None else apply
  params = initial_params
  opt_state = tx.init(params)
  for i in range(len(log)):
    params, opt_state = apply(params, opt_state, log.zograd(i))
  return params, opt_state
