"""A small LLaMA learning a random Markov chain (task 'markov'): no download, seconds on CPU.

The config to try multi-process runs with (README, "Many processes / pods"):

  python -m zojax.launch --processes 2 --devices_per_process 4 -- \\
      --config configs/markov_lm.py:opt=galore_adamw --workdir runs/markov_2x4
  python -m zojax.run --config configs/markov_lm.py:opt=zo_sgd,stream --workdir runs/m1

Variants (comma-separated in the arg):
  opt=NAME    adamw (default) | galore_adamw | zo_sgd (MeZO).
  stream      zo_sgd on the ZO2 engine (zo.engine='stream'): blocks rest in host memory, the
              batch split into 8 micro-batches (divisible by any data axis up to 8).
  tiny        6 steps, checkpoints every 3: the plumbing, in seconds (the tests use it).
  steps=T     training steps.

Expect: validation loss from log(64) = 4.16 at init towards the chain's entropy (below
log(4) = 1.39); adamw gets most of the way in a few hundred steps.
"""

import ml_collections

from configs import common

OPTIMIZERS = ("adamw", "galore_adamw", "zo_sgd")
LEARNING_RATES = {"adamw": 3e-3, "galore_adamw": 3e-3, "zo_sgd": 1e-3}


def markov_task() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = "markov"
  t.vocab_size = 64
  t.seq_len = 16
  t.successors = 4                 # tokens that may follow each token
  t.num_train = 4096
  t.num_eval = 256
  t.data_seed = 0                  # fixes the chain and the sets; config.seed shuffles batches
  return t


def get_config(arg=None):
  arg = common.parse_arg(arg, opt="adamw", stream=False, tiny=False, steps=300)
  if arg.opt not in OPTIMIZERS:
    raise ValueError(f"config arg opt={arg.opt!r} is not one of {OPTIMIZERS}")
  if arg.stream and arg.opt != "zo_sgd":
    raise ValueError(f"config arg stream needs opt=zo_sgd, not opt={arg.opt!r}")
  c = common.base_config()
  c.task = markov_task()
  c.model.name, c.model.init, c.model.vocab_size = "tiny", "random", 64
  c.optim.name = arg.opt
  c.optim.learning_rate = LEARNING_RATES[arg.opt]
  c.optim.galore = common.galore_settings()  # present, so optim.name=galore_adamw also works
  c.optim.galore.rank = 8
  c.optim.galore.update_proj_gap = 4
  c.train.steps = arg.steps
  c.train.batch_size = 16
  c.train.eval_batch_size = 64
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  if arg.stream:
    c.zo.engine = "stream"
    c.zo.microbatches = 8
  if arg.tiny:
    c.task.num_train, c.task.num_eval = 256, 64
    c.train.steps = 6
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.train.eval_at_start = False
    c.train.progress = False
  return c
