"""Pre-training from scratch on the offline corpus with the GaLore family (or AdamW, to compare).

  python -m zojax.run --config configs/corpus_galore.py --workdir runs/galore
  python -m zojax.run --config configs/corpus_galore.py:opt=natural_galore --workdir runs/ngalore
  python -m zojax.run --config configs/corpus_galore.py:tiny,opt=galore8bit --workdir /tmp/g8

Arg (comma-separated):
  opt=NAME     adamw | adam8bit | galore_adamw (default) | galore8bit | natural_galore
  randomized   GaLore's projector by warm-started subspace iteration instead of the exact SVD
  tiny         2-layer random model, 4 steps at seq_len 64, rank 8, T 2: plumbing check on CPU
  (default)    the GaLore paper's 60M LLaMA shape (untied, MHA; our 49k tokenizer vocab) from
               scratch at seq_len 256 with the paper's GaLore settings: lr 0.01, rank 128,
               scale 0.25, T 200, cosine with 10% warmup. AdamW runs at lr 1e-3 (the paper's).
Projected leaves (attention and MLP kernels) train at learning_rate * optim.galore.scale.
experiments/galore_pretrain.py runs the CPU-sized comparison with all of them.
"""

from configs import common

OPTIMIZERS = ("adamw", "adam8bit", "galore_adamw", "galore8bit", "natural_galore")


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, opt="galore_adamw", randomized=False, steps=2000)
  if arg.opt not in OPTIMIZERS:
    raise ValueError(f"config arg opt={arg.opt!r} is not one of {OPTIMIZERS}")
  c = common.base_config()
  c.task = common.corpus_task()
  c.model.name, c.model.init, c.model.vocab_size = "galore-60m", "random", 49152
  c.optim.name = arg.opt
  c.optim.galore = common.galore_settings()
  galore = arg.opt not in ("adamw", "adam8bit")
  c.optim.learning_rate = 1e-2 if galore else 1e-3
  c.optim.eps = 1e-6 if arg.opt in ("galore_adamw", "natural_galore") else 1e-8
  c.optim.schedule = "cosine"
  c.train.steps = arg.steps
  c.optim.warmup_steps = arg.steps // 10
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  c.optim.galore.projector = "randomized" if arg.randomized else "svd"
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.eval_every = 200
  if arg.tiny:
    c.model.name = "tiny"
    c.task.seq_len = 64
    c.task.eval_limit = 16
    c.optim.galore.rank = 8
    c.optim.galore.update_proj_gap = 2
    c.train.steps = 4
    c.optim.warmup_steps = 0
    c.train.eval_every = 0
    c.train.checkpoint_every = 2
  return c
