"""Pre-training a sparse MoE decoder on the offline corpus, with a choice of load balancer.

  python -m zojax.run --config configs/moe_lm.py --workdir runs/moe
  python -m zojax.run --config configs/moe_lm.py:rule=aux,alpha=0.01 --workdir runs/moe_aux
  python -m zojax.run --config configs/moe_lm.py:tiny,opt=zo_sgd --workdir /tmp/moe_zo

Arg (comma-separated):
  rule=NAME    none | aux | sign (default, DeepSeek's loss-free rule) | proportional |
               decay_sqrt | decay_linear  (zojax.moe.balance)
  u=FLOAT      the bias step (default 1e-3); alpha=FLOAT the aux-loss weight (default 1e-2)
  freeze=N     stop moving the bias after step N (0: never)
  dense        the dense LLaMA control with the same activated parameters (moe-small-dense)
  dispatch=    dropless (default) | capacity | dense;  capacity=FLOAT its capacity factor
  opt=NAME     adamw (default) | galore_adamw | zo_sgd
  ep=N         expert parallelism: experts sharded over an "expert" mesh axis of N devices,
               tokens exchanged by all-to-all (capacity buffers, factor `capacity`)
  seed=N, steps=N, batch=N
  tiny         a 2-layer, 8-expert model for a few steps at seq_len 32: plumbing check on CPU
(default)      moe-small: 4 layers, d=192, 16 experts of width 128, top-2 (6.9M parameters,
               2.8M active), on the corpus with ids mapped to the 4,096 most frequent,
               rows of 128 tokens; AdamW lr 3e-3, cosine with 10% warmup.
"""

import ml_collections

from configs import common

OPTIMIZERS = ("adamw", "galore_adamw", "zo_sgd")


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, rule="sign", u=1e-3, alpha=1e-2, freeze=0,
                         dense=False, dispatch="dropless", capacity=1.25, opt="adamw", seed=0,
                         steps=400, batch=16, ep=0)
  if arg.opt not in OPTIMIZERS:
    raise ValueError(f"config arg opt={arg.opt!r} is not one of {OPTIMIZERS}")
  c = common.base_config()
  c.seed = arg.seed
  c.task = common.corpus_task()
  c.task.seq_len = 128
  c.task.vocab_limit = 4096
  c.task.eval_limit = 128
  c.model.name = "moe-small-dense" if arg.dense else "moe-small"
  c.model.init = "random"
  if not arg.dense:
    c.model.dispatch = arg.dispatch
    c.model.capacity_factor = arg.capacity
    c.model.balance = ml_collections.ConfigDict()
    c.model.balance.rule = arg.rule
    c.model.balance.u = arg.u
    c.model.balance.alpha = arg.alpha
    c.model.balance.freeze_after = arg.freeze   # 0: never
  if arg.ep > 1:
    c.model.expert_parallel = True
    c.mesh.axes = (("data", -1), ("expert", arg.ep))
    c.mesh.rules = tuple(c.mesh.rules) + (("experts", "expert"),)
  c.optim.name = arg.opt
  c.optim.learning_rate = 3e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = arg.steps // 10
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  if arg.opt == "galore_adamw":
    c.optim.galore = common.galore_settings()
    c.optim.galore.rank = 32
  if arg.opt == "zo_sgd":
    c.optim.learning_rate = 1e-4
    c.optim.schedule = "constant"
    c.optim.grad_clip = 0.0
  c.train.steps = arg.steps
  c.train.batch_size = arg.batch
  c.train.eval_batch_size = 16
  c.train.eval_every = 100
  c.train.log_every = 10
  if arg.tiny:
    c.model.name = "moe-tiny"
    c.model.vocab_size = 4096
    c.task.seq_len = 32
    c.task.eval_limit = 8
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.optim.warmup_steps = 0
    c.train.eval_every = 0
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    if arg.opt == "galore_adamw":
      c.optim.galore.rank = 8
      c.optim.galore.update_proj_gap = 2
  return c
