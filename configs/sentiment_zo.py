"""SmolLM2-135M fine-tuned with zeroth-order SGD (MeZO) on Rotten Tomatoes, k-shot protocol.

  python -m zojax.run --config configs/sentiment_zo.py:k=16,kshot_seed=0 --workdir runs/zo16

Two forward passes per step, no backward, no optimizer state for plain ZO-SGD; the run's
weights are recoverable from the base weights plus `zo_log.json` (`zojax.zo.replay`). z is
Rademacher (±1, the configs' default `zo.direction`); `zo.direction=gaussian` gives MeZO's.

Variants (comma-separated in the arg):
  tiny        2-layer random model, a few steps, replay verified: plumbing check on CPU.
  adam        ZO-Adam instead of ZO-SGD.
  stream      the ZO2 engine (zo.engine='stream'): blocks and their optimizer state rest in
              host memory and stream through the step; same seed log, checkpoints flushed.
              With tiny: one device, 1 of the 2 blocks resident (both code paths run).
  n=N         n-SPSA: N perturbation directions per step (the estimate averages them).
  demo        the README demo's MeZO half: 100 steps at lr 3e-5 (the lr grid's best), 400
              test sentences.
  k=N, kshot_seed=S, steps=T, lr=X   as in MeZO's grid (its full-parameter OPT runs use
              lr in {1e-6, 1e-7}, eps 1e-3, batch 16, 20k-100k steps).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, adam=False, stream=False, demo=False, n=1, k=16, kshot_seed=0, steps=1000, lr=1e-6)
  c = common.base_config()
  c.task = common.sentiment_task()
  c.task.k = arg.k
  c.task.kshot_seed = arg.kshot_seed
  c.optim.name = "zo_adam" if arg.adam else "zo_sgd"
  c.optim.learning_rate = arg.lr
  c.zo.eps = 1e-3
  c.zo.num_samples = arg.n
  c.train.steps = arg.steps
  c.train.batch_size = 16
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.log_every = 10
  if arg.demo:
    c.optim.learning_rate = 3e-5
    c.train.steps = 100
    c.train.eval_every = 0
    c.train.checkpoint_every = 50
    c.task.eval_limit = 400        # the AdamW demo's 400-sentence test subset
    c.task.eval_splits = ("test",)
  if arg.stream:
    c.zo.engine = "stream"
  if arg.tiny:
    c.model.name, c.model.init, c.model.vocab_size = "tiny", "random", 49152
    c.optim.learning_rate = 1e-2 if not arg.adam else 1e-3
    c.task.eval_limit = 64
    c.train.steps = 6
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 3
    c.zo.verify_replay = True
    if arg.stream:
      c.mesh.axes = (("data", 1), ("model", 1))
      c.zo.resident_blocks = 1
  return c
