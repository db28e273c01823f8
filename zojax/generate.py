"""Generate text from a config's decoder: python -m zojax.generate --config configs/X.py[:arg] --prompt "...".

  python -m zojax.generate --config configs/corpus_lm.py --prompt "It is a truth"
  python -m zojax.generate --config configs/moe_lm.py:tiny --workdir runs/moe --prompt "The"
  python -m zojax.generate --config configs/markov_lm.py:tiny --prompt "1 2 3" --top_k 5 \\
      --temperature 0.8 --seed 1

The model and tokenizer come from the config (model.init='pretrained' loads SmolLM2's
weights); `--workdir` loads the newest checkpoint of that run (params and model state, e.g.
the MoE router bias). Text tasks (corpus, sentiment) use SmolLM2's tokenizer, mapped onto the
task's reduced vocabulary when it has one (ids outside it read as <rare>) and stop at
<|im_end|>; the Markov task takes and prints token ids separated by spaces. Prints the
continuation only. Bad input is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Callable, NamedTuple

import numpy as np

from zojax.data.fetch import AssetError
from zojax.errors import ConfigError

RARE = "<rare>"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, like every other bad input
    raise ConfigError(message)


class Codec(NamedTuple):
  """Text <-> the task's token ids."""

  encode: Callable[[str], list[int]]
  decode: Callable[[list[int]], str]
  vocab_size: int
  eos_id: int | None


def _ids_codec(vocab_size: int) -> Codec:
  def encode(text):
    try:
      return [int(t) for t in text.split()]
    except ValueError:
      raise ConfigError(f"--prompt {text!r}: this task's prompts are token ids separated by "
                        "spaces") from None

  return Codec(encode, lambda ids: " ".join(map(str, ids)), vocab_size, None)


def _text_codec(task_cfg) -> Codec:
  from zojax.data import corpus  # noqa: PLC0415  (tokenizer and corpus: text tasks only)
  from zojax.data.tokenizer import smollm2_tokenizer  # noqa: PLC0415
  tok = smollm2_tokenizer()
  vocab = tok.get_vocab_size()
  encode = lambda text: tok.encode(text, add_special_tokens=False).ids
  limit = task_cfg.get("vocab_limit", 0) if task_cfg.name == "corpus" else 0
  if not limit:
    return Codec(encode, lambda ids: tok.decode(ids), vocab, corpus.EOS_ID)
  # The task's id map (`tasks._corpus`): the limit - 1 most frequent train ids + one bucket.
  train = corpus.packed_sequences(tok, task_cfg.seq_len, "train",
                                  val_fraction=task_cfg.val_fraction)
  remap, _ = corpus.frequency_remap(train, vocab, limit)
  original = np.full(limit, -1, np.int64)
  kept = np.flatnonzero(remap < limit - 1)
  original[remap[kept]] = kept

  def decode(ids):
    pieces, run = [], []
    for i in ids:
      if original[i] < 0:
        pieces += [tok.decode(run), RARE]
        run = []
      else:
        run.append(int(original[i]))
    return "".join(pieces + [tok.decode(run)])

  return Codec(lambda text: remap[encode(text)].tolist(), decode, limit,
               int(remap[corpus.EOS_ID]))


def codec(task_cfg) -> Codec:
  """How a task's text becomes token ids; ConfigError for tasks without text."""
  if task_cfg.name == "markov":
    return _ids_codec(task_cfg.vocab_size)
  if task_cfg.name in ("corpus", "sentiment"):
    return _text_codec(task_cfg)
  raise ConfigError(f"config key 'task.name'={task_cfg.name!r}: generation needs a token task "
                    "(corpus, sentiment or markov)")


# Config keys a checkpoint's run may have set otherwise without changing what it computes
# here: weights come from the checkpoint, generation runs its own dispatch and attention.
NOT_COMPARED = ("model.init", "model.attention", "model.remat", "model.balance",
                "model.dispatch", "model.capacity_factor", "model.expert_parallel",
                "task.eval_limit", "task.eval_splits")


def _changed(stored: dict, current: dict) -> list[str]:
  """The model.* and task.* keys whose values differ (except `NOT_COMPARED`)."""
  out = []
  for block in ("model", "task"):
    a, b = stored.get(block, {}), current.get(block, {})
    out += [f"{block}.{k}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and f"{block}.{k}" not in NOT_COMPARED]
  return out


def _run_config(mngr) -> dict:
  """The config saved with the newest checkpoint ({} if unreadable: the restore says why)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  meta_dir = pathlib.Path(mngr.directory) / str(mngr.latest_step()) / "meta"
  try:
    meta = ocp.JsonCheckpointHandler().restore(meta_dir, args=ocp.args.JsonRestore())
  except Exception:  # noqa: BLE001  (any unreadable record)
    return {}
  return dict(meta).get("config", {})


def load_weights(config, model, workdir: str | None):
  """(params, model_state) on the host: the newest checkpoint in `workdir`, else the
  config's initial weights (pretrained or random with config.seed)."""
  import jax  # noqa: PLC0415
  from zojax.train import checkpoint, distributed, engines  # noqa: PLC0415
  from zojax.train.engines import base  # noqa: PLC0415
  if workdir is None:
    key = jax.random.key(config.seed)
    return (jax.device_get(base.initial_params(config, model, None)),
            jax.device_get(model.init_state(key)))
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ConfigError(f"--workdir {workdir}: no checkpoints directory (train it first: "
                      "python -m zojax.run)")
  mngr = checkpoint.manager(directory, keep=1)
  if mngr.latest_step() is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint in {directory}")
  changed = _changed(_run_config(mngr), json.loads(config.to_json()))
  if changed:
    raise ConfigError(f"--workdir {workdir} was trained with another model/task config (keys "
                      f"{', '.join(changed)}); pass the run's --config")
  engine = engines.build(config, model, distributed.make_mesh(config.mesh.axes))
  step, state, _ = checkpoint.restore_latest(mngr, engine.abstract_state())
  logging.getLogger(__name__).info("loaded step %d of %s", step, workdir)
  params, model_state = engine.params(state)
  return jax.device_get(params), jax.device_get(model_state)


def run(args) -> str:
  """The continuation `args` ask for (see the module docstring)."""
  from zojax.train import config as config_lib  # noqa: PLC0415  (keeps --help fast)
  if not args.prompt.strip():
    raise ConfigError("--prompt is empty: generation needs at least one token")
  if args.max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={args.max_new_tokens} must be >= 1")
  if args.temperature < 0:
    raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0: greedy)")
  if args.top_k is not None and args.top_k < 1:
    raise ConfigError(f"--top_k={args.top_k} must be >= 1")
  config = config_lib.load(args.config)
  text = codec(config.task)
  prompt = text.encode(args.prompt)
  if not prompt:
    raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens")
  if any(not 0 <= t < text.vocab_size for t in prompt):
    raise ConfigError(f"--prompt has token ids outside [0, {text.vocab_size})")
  needed = len(prompt) + args.max_new_tokens - 1
  if needed > args.max_len:
    raise ConfigError(f"--max_len={args.max_len} is too short: the prompt has {len(prompt)} "
                      f"tokens and --max_new_tokens={args.max_new_tokens} needs {needed}")

  import jax  # noqa: PLC0415
  from zojax import models  # noqa: PLC0415
  from zojax.infer import generate as gen  # noqa: PLC0415
  model = models.build(config.model, text)  # the factories read the vocabulary size only
  decoder = gen.decoder_config(model)
  if args.top_k is not None and args.top_k > text.vocab_size:
    raise ConfigError(f"--top_k={args.top_k} is larger than the vocabulary ({text.vocab_size})")
  params, model_state = load_weights(config, model, args.workdir)
  ids = gen.generate(decoder, params, model_state, [prompt], args.max_new_tokens,
                     temperature=args.temperature, top_k=args.top_k,
                     key=jax.random.key(args.seed), eos_id=text.eos_id)[0]
  if text.eos_id is not None and ids and ids[-1] == text.eos_id:
    ids = ids[:-1]
  return text.decode(ids)


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog="python -m zojax.generate", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:arg")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--workdir", help="a zojax.run directory: its newest checkpoint")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely")
  parser.add_argument("--seed", type=int, default=0, help="sampling key")
  parser.add_argument("--max_len", type=int, default=2048,
                      help="the longest cache (prompt + new tokens) accepted")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it reads
  try:
    print(run(parser.parse_args(argv)))
  except (ConfigError, AssetError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
