"""SmolLM2-135M fine-tuned with AdamW on Rotten Tomatoes sentences, MeZO's k-shot protocol.

  python -m zojax.run --config configs/sentiment_adamw.py:k=16,kshot_seed=0 --workdir runs/ft16

Variants (comma-separated in the arg):
  tiny        a 2-layer random model, 4 steps: checks the plumbing on CPU in seconds.
  demo        the README demo: zero-shot eval, then a short fine-tune, ~10 min on 2 CPU cores.
  k=N         examples per class (MeZO: 16 or 512); kshot_seed=S picks the sample.

Expect (BENCHMARKS.md): zero-shot test accuracy well above chance, and higher after
fine-tuning; MeZO's paper fine-tunes for 1000 steps at batch 8, which CPU cannot afford.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, demo=False, k=16, kshot_seed=0, steps=100)
  c = common.base_config()
  c.task = common.sentiment_task()
  c.task.k = arg.k
  c.task.kshot_seed = arg.kshot_seed
  c.optim.learning_rate = 1e-5     # MeZO's FT grid: {1e-5, 5e-5, 8e-5}
  c.train.steps = arg.steps
  c.train.batch_size = 8
  c.train.checkpoint_every = 50
  if arg.demo:
    c.train.steps = 24
    c.task.eval_limit = 400        # first 400 of the 1000 test examples, to fit ~10 min on CPU
    c.task.eval_splits = ("test",)
  if arg.tiny:
    c.model.name = "tiny"
    c.model.init = "random"
    c.model.vocab_size = 49152     # the SmolLM2 tokenizer's
    c.optim.learning_rate = 1e-3
    c.task.eval_limit = 64
    c.train.steps = 4
    c.train.eval_batch_size = 32
    c.train.checkpoint_every = 2
  return c
