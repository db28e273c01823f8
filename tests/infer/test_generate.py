"""KV-cache generation (zojax.infer.generate): cached logits equal the full forward at every
position for LLaMA and MoE (with an off-by-one negative control), greedy equals the no-cache
decoder, batched rows equal single prompts, sampling is reproducible, EOS, the CLI."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from zojax import generate as cli, models
from zojax.errors import ConfigError
from zojax.infer import generate as gen
from zojax.models import llama, moe

PROMPTS = ([5, 17, 3, 99, 42, 7, 8], [200, 1, 64, 9])  # different lengths
NEW = 5
TOTAL = 12  # longest prompt + NEW: the no-cache reference runs on [2, TOTAL]


def _sharpen(params, scale=8.0):
  """Weights scaled up from the 0.02 init: peaked logits and varied greedy text, so that
  token-level checks can fail (a fresh tiny model repeats its last token)."""
  return jax.tree.map(lambda w: w * scale if w.ndim >= 2 else w, params)


def _models():
  tiny = llama.CONFIGS["tiny"]
  moe_config = moe.CONFIGS["moe-tiny"]
  moe_state = moe.init_state(moe_config, jax.random.key(0))
  moe_state = {"bias": 0.3 * jax.random.normal(jax.random.key(1), moe_state["bias"].shape),
               "prev_bias": moe_state["prev_bias"]}
  return {
      "llama": (tiny, _sharpen(llama.init(tiny, jax.random.key(0))), {}),
      "moe": (moe_config, _sharpen(moe.init(moe_config, jax.random.key(0))), moe_state),
  }


MODELS = _models()
reference = jax.jit(gen.forward_logits, static_argnums=0)


def _padded(prompts, length):
  tokens = np.zeros((len(prompts), length), np.int32)
  for b, ids in enumerate(prompts):
    tokens[b, :len(ids)] = ids
  return jnp.asarray(tokens)


def _greedy_without_cache(config, params, state, prompts, num):
  """Greedy by re-running the full forward on the padded batch (causal: padding is inert)."""
  rows = [list(p) for p in prompts]
  for _ in range(num):
    logits = np.asarray(reference(config, params, state, _padded(rows, TOTAL)))
    for b, row in enumerate(rows):
      row.append(int(np.argmax(logits[b, len(row) - 1])))
  return [row[len(p):] for row, p in zip(rows, prompts)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
  config, params, state = MODELS[request.param]
  return request.param, config, params, state


def _cached_logits(config, params, state, tokens_BxT, lengths, shift=0):
  """Logits at every position of each row: prefill of its prompt, then one decode step per
  later token (fed at its position + `shift`)."""
  B, T = tokens_BxT.shape
  cache = gen.init_cache(config, B, T + 1)
  first = max(lengths)
  positions = jnp.broadcast_to(jnp.arange(first), (B, first))
  logits, cache = gen.forward(config, params, state, cache, tokens_BxT[:, :first], positions)
  out = {(b, t): logits[b, t] for b in range(B) for t in range(lengths[b])}
  for i in range(T - min(lengths)):
    pos = np.minimum(np.asarray(lengths) + i, T - 1)  # a finished row repeats its last one
    tokens = tokens_BxT[jnp.arange(B), pos]
    step, cache = gen.decode_step(config, params, state, cache, tokens,
                                  jnp.asarray(pos + shift, jnp.int32))
    out.update({(b, int(pos[b])): step[b] for b in range(B)})
  return out


def test_cached_logits_equal_full_forward_at_every_position(model):
  name, config, params, state = model
  tokens = _padded([p + [11, 12, 13, 14, 15][:TOTAL - len(p)] for p in PROMPTS], TOTAL)
  lengths = [len(p) for p in PROMPTS]
  want = np.asarray(reference(config, params, state, tokens))
  got = _cached_logits(config, params, state, tokens, lengths)
  assert len(got) == 2 * TOTAL
  for (b, t), logits in got.items():
    np.testing.assert_allclose(np.asarray(logits), want[b, t], atol=2e-5, rtol=1e-5,
                               err_msg=f"{name} row {b} position {t}")
  # Negative control: decode steps fed one position too far do not match.
  shifted = _cached_logits(config, params, state, tokens, lengths, shift=1)
  errors = [np.abs(np.asarray(shifted[b, t]) - want[b, t]).max()
            for b in range(2) for t in range(lengths[b], TOTAL)]
  assert min(errors) > 10 * 2e-5, errors
  if name == "moe":  # the selection bias is read: zero bias gives other logits
    zero = {k: jnp.zeros_like(v) for k, v in state.items()}
    assert np.abs(np.asarray(reference(config, params, zero, tokens)) - want).max() > 1e-2


def test_greedy_equals_no_cache_and_rows_equal_single_prompts(model):
  name, config, params, state = model
  got = gen.generate(config, params, state, PROMPTS, NEW)
  assert got == _greedy_without_cache(config, params, state, PROMPTS, NEW)
  assert len({t for row in got for t in row}) > 3, got  # not one repeated token
  if name == "llama":  # (MoE rows: the no-cache check above; each compile costs seconds)
    # The shorter (padded) prompt alone, and LLaMA's own no-cache decoder.
    assert gen.generate(config, params, state, PROMPTS[1:], NEW) == got[1:]
    assert llama.greedy_generate(config, params, PROMPTS[1], NEW) == got[1]


def test_sampling_is_reproducible_and_tends_to_greedy():
  # One compilation serves every call below: temperature, top_k, key and EOS are traced.
  config, params, state = MODELS["llama"]
  flat = jax.tree.map(lambda w: w / 8, params)  # the 0.02 init: near-uniform sampling
  run = lambda prompts, seed, p=flat, **kw: gen.generate(
      config, p, state, prompts, NEW, key=jax.random.key(seed), **kw)
  a = run(PROMPTS, 0, temperature=1.0)
  assert a == run(PROMPTS, 0, temperature=1.0)
  assert a != run(PROMPTS, 1, temperature=1.0) and a[0] != a[1]
  # Row b draws from fold_in(key, b), whatever the other rows hold.
  assert run([PROMPTS[0], PROMPTS[0]], 0, temperature=1.0)[0] == a[0]
  greedy = run(PROMPTS, 0, p=params)
  assert run(PROMPTS, 3, p=params, temperature=3.0, top_k=1) == greedy
  assert run(PROMPTS, 3, temperature=3.0, top_k=1) == run(PROMPTS, 0, p=flat)
  # A small temperature is greedy where the top two logits are far apart (checked).
  rows = [list(p) + g for p, g in zip(PROMPTS, greedy)]
  logits = np.sort(np.asarray(reference(config, params, state, _padded(rows, TOTAL))), -1)
  gaps = [logits[b, len(p) - 1 + i, -1] - logits[b, len(p) - 1 + i, -2]
          for b, p in enumerate(PROMPTS) for i in range(NEW)]
  assert run(PROMPTS, 4, p=params, temperature=min(gaps) / 50) == greedy
  # EOS: a row stops after it, the others go on.
  eos = greedy[0][2]
  cut = lambda row: row[:row.index(eos) + 1] if eos in row else row
  got = run(PROMPTS, 0, p=params, eos_id=eos)
  assert got == [cut(row) for row in greedy] and len(got[0]) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompt"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_len=5), "max_len=5 is too short"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k=0"),
    (dict(prompts=[[1, 256]]), r"outside \[0, 256\)"),
])
def test_bad_requests_name_the_argument(kwargs, match):
  args = dict(prompts=[[1, 2, 3]], max_new_tokens=4, vocab_size=256) | kwargs
  with pytest.raises(ConfigError, match=match):
    gen.check_request(args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_decoder_config_reads_back_the_registered_config():
  config = dataclasses.replace(moe.CONFIGS["moe-tiny"], shared_expert=True, dispatch="capacity")
  assert gen.decoder_config(moe.model(config, name="moe-tiny")) == config
  with pytest.raises(ConfigError, match="needs a LLaMA or MoE decoder"):
    gen.decoder_config(models.Model(name="cnn", init=None, axes={}, loss=None))


# ---------------------------------------------------------------------------------------
# The CLI, on the Markov config (token ids as text, no download)

MARKOV = "configs/markov_lm.py:tiny"


def test_cli_prints_generated_tokens_and_loads_a_checkpoint(tmp_path, capsys):
  from zojax.train import checkpoint, config as config_lib, distributed, engines  # noqa: PLC0415
  argv = ["--config", MARKOV, "--prompt", "1 2 3 4", "--max_new_tokens", "6"]
  assert cli.main(argv) == 0
  fresh = capsys.readouterr().out.strip()
  # A checkpoint with other weights: the CLI must generate from them.
  config = config_lib.load(MARKOV)
  model = models.build(config.model, ml_collections.ConfigDict({"vocab_size": 64}))
  engine = engines.build(config, model, distributed.make_mesh(config.mesh.axes))
  abstract = engine.abstract_state()  # zeros but the params: cheaper than engine.init()
  state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                       abstract)
  params = _sharpen(model.init(jax.random.key(5)))
  state = state._replace(params=jax.device_put(params, jax.tree.map(lambda a: a.sharding,
                                                                    abstract.params)))
  mngr = checkpoint.manager(tmp_path / "checkpoints", keep=1)
  checkpoint.save(mngr, 3, state, {"config": json.loads(config.to_json())}, force=True)
  assert cli.main(argv + ["--workdir", str(tmp_path)]) == 0
  trained = capsys.readouterr().out.strip()
  decoder = dataclasses.replace(llama.CONFIGS["tiny"], vocab_size=64, attention="auto")
  assert gen.decoder_config(model) == decoder
  want = gen.generate(decoder, params, {}, [[1, 2, 3, 4]], 6)[0]
  assert trained == " ".join(map(str, want)) and trained != fresh


@pytest.mark.parametrize("argv, match", [
    (["--config", "configs/nope.py", "--prompt", "1"], "no such file"),
    (["--config", MARKOV, "--prompt", ""], "--prompt"),
    (["--config", MARKOV, "--prompt", "1 2", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["--config", MARKOV, "--prompt", "1 2 3", "--max_len", "3"], "--max_len"),
    (["--config", MARKOV, "--prompt", "1 x"], "--prompt"),
    (["--config", MARKOV, "--prompt", "1", "--workdir", "/nonexistent/run"], "--workdir"),
])
def test_cli_bad_input_is_one_line(argv, match, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and match in err, err


def test_cli_compares_the_run_config_except_keys_that_do_not_change_generation():
  stored = {"model": {"name": "moe-small", "attention": "xla", "balance": {"u": 0.01}},
            "task": {"name": "corpus", "vocab_limit": 4096, "eval_limit": 128}}
  same = {"model": {"name": "moe-small", "attention": "auto", "balance": {"u": 0.001}},
          "task": {"name": "corpus", "vocab_limit": 4096, "eval_limit": 8}}
  assert cli._changed(stored, same) == []
  other = {"model": {**same["model"], "name": "moe-small-dense"},
           "task": {**same["task"], "vocab_limit": 0}}
  assert cli._changed(stored, other) == ["model.name", "task.vocab_limit"]
