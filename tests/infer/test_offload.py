"""The offloaded MoE engine: bit-identical to all-resident inference whatever the budget and
the predictions, the bytes it moves equal the simulator's on its own trace, and quantised
experts change results (the control that the comparisons can see a difference)."""

import dataclasses

import jax
import numpy as np
import pytest

from zojax.errors import ConfigError
from zojax.infer import generate as gen
from zojax.infer import offload, simulate
from zojax.infer import store as store_lib
from zojax.models import moe

CONFIG = moe.CONFIGS["moe-tiny"]          # 2 layers, 8 experts, top-2, D 64, F 32
NEW = 4                                   # generated tokens per run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  params = moe.init(CONFIG, jax.random.key(0))
  bias = 0.3 * jax.random.normal(jax.random.key(1), (2, 8))   # the selection bias routes
  state = {"bias": bias, "prev_bias": bias}
  path = tmp_path_factory.mktemp("store") / "experts"
  offload.write_expert_store(path, CONFIG, params)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, CONFIG.base.vocab_size, (2, 12)).astype(np.int32)
  calib = rng.integers(0, CONFIG.base.vocab_size, (2, 12)).astype(np.int32)
  resident = offload.OffloadEngine(CONFIG, params, state, resident=True, max_len=32)
  return dict(params=params, state=state, path=path, prompts=prompts,
              reference=resident.generate(prompts, NEW),
              calibration=resident.generate(calib, NEW).trace)


def _engine(model, name, slots, quant="off", **kwargs):
  policy = simulate.policy(name, slots=slots, num_experts=8, quant=quant,
                           int2_rate=kwargs.pop("int2_rate", 0.0),
                           prefetch_k=kwargs.pop("prefetch_k", 2))
  warm = simulate.warm_lists(model["calibration"], policy.slots)
  store = store_lib.open_store(model["path"])
  return offload.OffloadEngine(CONFIG, model["params"], model["state"], store, policy,
                               warm=warm, max_len=32, **kwargs), policy, store


def test_resident_reference_matches_the_model(model):
  """The engine's all-resident path against the model's own forward (no cache) over the
  prompt and the generated tokens: logits at every position, and the greedy choices."""
  out, prompts = model["reference"], model["prompts"]
  T = prompts.shape[1]
  sequence = np.concatenate([prompts, out.tokens[:, :-1]], axis=1)
  full = np.asarray(gen.forward_logits(CONFIG, model["params"], model["state"], sequence))
  np.testing.assert_allclose(out.prefill_logits, full[:, :T], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.decode_logits, full[:, T:].transpose(1, 0, 2), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(out.tokens, full[:, T - 1:].argmax(-1))


@pytest.mark.parametrize("name, slots, hook", [
    ("fate", (8, 3), None),        # first layer resident, 3 slots below
    ("lod", (0, 0), None),         # no cache: every expert moved every call
    ("fate", (1, 1), "reverse"),   # adversarial: the gate's worst experts predicted
])
def test_bit_identical_to_resident_and_bytes_equal_the_simulator(model, name, slots, hook):
  rank_hook = (lambda phase, layer, rank: rank[:, ::-1]) if hook else None
  engine, policy, store = _engine(model, name, slots, rank_hook=rank_hook)
  out = engine.generate(model["prompts"], NEW)
  ref = model["reference"]
  assert out.prefill_logits.tobytes() == ref.prefill_logits.tobytes()
  assert out.decode_logits.tobytes() == ref.decode_logits.tobytes()
  assert out.tokens.tolist() == ref.tokens.tolist()
  np.testing.assert_array_equal(out.trace.decode_experts, ref.trace.decode_experts)

  moved = engine.bytes_moved()
  expert_bytes = {f: store.expert_nbytes(f) for f in store.formats}
  if hook is None:  # the simulator replays the recorded gate; the hook is engine-only
    sim = simulate.simulate(out.trace, policy, expert_bytes, calibration=model["calibration"])
    assert moved["setup"] == sim.bytes("setup")
    assert moved["calls"] == sim.bytes("prefill") + sim.bytes("decode") > 0
    assert engine.report() == sim.report
  else:
    assert engine.report()["prefill"]["overall"]["precision"] < 0.5
  held = engine.device_bytes()["expert_pools"]
  assert held == sum(slots) * store.expert_nbytes("full")
  if name == "lod":  # each call moves exactly the experts it needs
    needed = sum(len(np.unique(e)) for e in out.trace.prefill_experts) + sum(
        len(np.unique(e)) for step in out.trace.decode_experts for e in step)
    assert moved["calls"] == needed * store.expert_nbytes("full")
  store.close()


def test_quantised_experts_change_results_and_move_fewer_bytes(model):
  """The control: INT4 / hybrid INT2 experts give different logits (the bit-equality above
  can fail), close to full precision, and move fewer bytes than full precision."""
  ref = model["reference"]
  full, _, s0 = _engine(model, "lod", (0, 0))
  full.generate(model["prompts"], NEW)
  for quant, rate in (("int4", 0.0), ("hybrid", 0.5)):
    engine, _, store = _engine(model, "lod" if quant == "int4" else "fate", (0, 0),
                               quant=quant, int2_rate=rate)
    out = engine.generate(model["prompts"], NEW)
    assert out.prefill_logits.tobytes() != ref.prefill_logits.tobytes()
    err = np.abs(out.prefill_logits - ref.prefill_logits).max()
    assert err < 0.1 * np.abs(ref.prefill_logits).max()
    assert engine.bytes_moved()["calls"] < full.bytes_moved()["calls"]
    if quant == "hybrid":
      assert engine.report()["prefill"]["bytes"].get("prefetch/int2")
      assert engine.device_bytes()["expert_pools"] == 0   # zero cache: no slots at all
    store.close()
  s0.close()


def test_bad_input(model, tmp_path):
  engine, policy, store = _engine(model, "lod", (0, 0))
  with pytest.raises(ConfigError, match="exceeds max_len=32"):
    engine.generate(np.zeros((1, 30), np.int32), 4)
  with pytest.raises(ConfigError, match="prompts must be"):
    engine.generate(np.zeros((3,), np.int32), 1)
  with pytest.raises(ConfigError, match="has 3 layers, the model 2"):
    offload.OffloadEngine(CONFIG, model["params"], model["state"], store,
                          dataclasses.replace(policy, slots=(0, 0, 0)))
  offload.write_expert_store(tmp_path / "full_only", CONFIG, model["params"],
                             formats=("full",))
  with pytest.raises(ConfigError, match="lacks format 'int4'"):
    offload.OffloadEngine(CONFIG, model["params"], model["state"],
                          store_lib.open_store(tmp_path / "full_only"),
                          simulate.policy("lod", slots=(0, 0), num_experts=8, quant="int4"))
  with pytest.raises(store_lib.StoreError):
    store_lib.open_store(tmp_path / "missing")
  store.close()
