"""Language modelling on the offline corpus (Austen + KJV + fortunes), SmolLM2 tokenizer.

  python -m zojax.run --config configs/corpus_lm.py --workdir runs/lm
  python -m zojax.run --config configs/corpus_lm.py:random --workdir runs/lm_scratch

Variants:
  (default)   continue training the pretrained SmolLM2-135M; reports validation perplexity
              before and after.
  random      the same model from random init (a pre-training run).
  tiny        a 2-layer random model, a few steps at seq_len 64: plumbing check on CPU.
  galore60m   the GaLore paper's 60M LLaMA shape (untied, MHA) from scratch, seq_len 256.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, random=False, galore60m=False, steps=200)
  c = common.base_config()
  c.task = common.corpus_task()
  c.optim.learning_rate = 3e-5
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0
  c.train.steps = arg.steps
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.eval_every = 100
  if arg.random or arg.galore60m:
    c.model.init = "random"
    c.optim.learning_rate = 1e-3
  if arg.galore60m:
    c.model.name = "galore-60m"
    c.model.vocab_size = 49152     # our tokenizer's, not the paper's T5 32k
  if arg.tiny:
    c.model.name, c.model.init, c.model.vocab_size = "tiny", "random", 49152
    c.optim.learning_rate = 1e-3
    c.task.seq_len = 64
    c.task.eval_limit = 16
    c.train.steps = 4
    c.train.eval_every = 0
    c.train.checkpoint_every = 2
  return c
