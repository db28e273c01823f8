"""A Flax NNX CNN (`nnx-cnn`, via zojax.models.from_flax) on synthetic oriented bars.

  python -m zojax.run --config configs/flax_classifier.py --workdir runs/bars
  python -m zojax.run --config configs/flax_classifier.py:opt=zo_sgd --workdir runs/bars_zo

Any model registered from an `nnx.Module` trains through the same loop and engines as the
LLaMA family; this config is the small, download-free example. The task
(`zojax.data.synthetic.oriented_bars`) is 8x8 images of one noisy bar in one of 4
orientations; chance is 0.25. The network's BatchNorm statistics are model state: kept
beside the params, checkpointed, updated after every step, never touched by the optimizer.

Variants (comma-separated in the arg):
  tiny        20 steps of a smaller net on fewer examples: the plumbing, in CPU seconds.
  opt=NAME    adamw (default) | galore_adamw (the mlp/ kernels projected, rank 8) |
              zo_sgd (MeZO), each with its own learning rate and steps below.
  steps=T     training steps (0: the optimizer's default).

Expect (seed 0, 2 shared CPU cores; test accuracy, chance 0.25): adamw 0.20 -> 0.81 in 300
steps (~30 s in all); galore_adamw 0.20 -> 0.82 in 300 steps; zo_sgd 0.20 -> 0.39 in 3000
steps (~55 s): SPSA on ~4.7k weights from scratch is slow, and lr 1e-2 diverges.
"""

import ml_collections

from configs import common

OPTIMIZERS = ("adamw", "galore_adamw", "zo_sgd")
LEARNING_RATES = {"adamw": 3e-3, "galore_adamw": 3e-3, "zo_sgd": 3e-3}
STEPS = {"adamw": 300, "galore_adamw": 300, "zo_sgd": 3000}


def oriented_bars_task() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = "oriented_bars"
  t.image_size = 8
  t.bar_length = 5
  t.noise = 0.5                    # pixel noise std; the bar is 1 on a 0 background
  t.num_train = 4096
  t.num_eval = 1024                # per eval set (validation, test)
  t.data_seed = 0                  # fixes the sets; config.seed shuffles the batches
  return t


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, opt="adamw", steps=0)
  if arg.opt not in OPTIMIZERS:
    raise ValueError(f"config arg opt={arg.opt!r} is not one of {OPTIMIZERS}")
  c = common.base_config()
  c.task = oriented_bars_task()
  c.model.name = "nnx-cnn"
  c.model.init = "random"
  c.model.channels = 16
  c.model.hidden = 64
  c.optim.name = arg.opt
  c.optim.learning_rate = LEARNING_RATES[arg.opt]
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 10
  # Always present, so `optim.name=galore_adamw` also works as an override.
  c.optim.galore = common.galore_settings()
  c.optim.galore.rank = 8          # <= min(channels, hidden)
  c.optim.galore.update_proj_gap = 50
  c.optim.galore.scale = 1.0
  c.zo.eps = 1e-3
  c.train.steps = arg.steps or STEPS[arg.opt]
  c.train.batch_size = 32
  c.train.eval_batch_size = 256
  c.train.eval_every = max(c.train.steps // 3, 1)
  c.train.checkpoint_every = max(c.train.steps // 3, 1)
  if arg.tiny:
    c.task.num_train = 256
    c.task.num_eval = 64
    c.model.channels = 8
    c.model.hidden = 16
    c.optim.galore.rank = 4
    c.optim.galore.update_proj_gap = 5
    c.optim.warmup_steps = 0
    c.train.steps = arg.steps or 20
    c.train.batch_size = 16
    c.train.eval_batch_size = 32
    c.train.eval_every = 0
    c.train.checkpoint_every = 10
  return c
