"""Defaults shared by every config; each config file overrides what it is about."""

import ml_collections


def parse_arg(arg, **defaults):
  """`arg` like "tiny" or "k=512,seed=3" -> ConfigDict of `defaults` updated (big_vision style)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    if key not in out:
      raise ValueError(f"config arg {key!r} is not one of {sorted(out)}")
    kind = type(out[key])
    if kind is bool:
      # Strict: bool("False") is True, and a typo must not silently mean True.
      if not sep or text in ("true", "True", "1"):
        out[key] = True
      elif text in ("false", "False", "0"):
        out[key] = False
      else:
        raise ValueError(f"config arg {key!r}={text!r} is not a boolean (true/false/1/0)")
    elif not sep:
      raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
    else:
      try:
        out[key] = kind(text)
      except ValueError:
        raise ValueError(f"config arg {key!r}={text!r} is not of type {kind.__name__}") from None
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m"
  c.model.init = "pretrained"      # or "random"
  c.model.vocab_size = 0           # 0: the model's own
  c.model.dtype = "float32"        # compute dtype
  c.model.remat = False            # recompute block activations in the backward pass
  # auto: the Pallas flash kernel on a GPU; on CPU naive (xla) below 1024 keys, blockwise
  # (O(N) memory) from there (zojax.kernels.attention.default_implementation). Or pick one:
  # xla | blockwise | pallas.
  c.model.attention = "auto"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-5
  c.optim.schedule = "constant"    # constant | linear | cosine | onecycle
  c.optim.warmup_steps = 0
  # onecycle (PyTorch OneCycleLR, cosine): lr/div_factor -> lr over the first pct_start of the
  # steps -> lr/div_factor/final_div_factor; b1 cycles b1 -> b1_min -> b1 (0: b1 fixed).
  c.optim.pct_start = 0.3
  c.optim.div_factor = 25.0
  c.optim.final_div_factor = 1e4
  c.optim.b1_min = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.0
  c.optim.grad_clip = 0.0          # 0: off

  # Zeroth-order estimate (used when optim.name is zo_sgd / zo_adam / zo_sign).
  c.zo = ml_collections.ConfigDict()
  c.zo.eps = 1e-3                  # perturbation scale (MeZO: 1e-3)
  c.zo.num_samples = 1             # perturbation directions per step (n-SPSA)
  c.zo.one_sided = False
  # Distribution of z: rademacher (+-1, Spall's SPSA) | gaussian (MeZO). Rademacher is the
  # default: its step costs 1.04x two forwards against Gaussian's 1.34x (experiments/bench_zo.py,
  # CPU), and on the MeZO sentiment task it matched Gaussian at equal steps (100 steps, lr 3e-5,
  # 400 test sentences: 0.7075 vs 0.6825 at k=16, 0.695 vs 0.705 at k=512; BENCHMARKS.md).
  c.zo.direction = "rademacher"
  # How the step's work is cut (the same on any mesh, so the trajectory is too): the batch in
  # micro-batches sharing z (a multiple of the mesh's data axis for zo.engine='stream'), and
  # SPSA branches per streamed unit (2: a sample's +-eps together; 1: one each).
  c.zo.microbatches = 1
  c.zo.branch_group = 2
  c.zo.verify_replay = False       # after training, replay the seed log and check bit-equality
  c.zo.engine = "dense"            # dense (zo.spsa + update) | stream (ZO2: blocks in host memory)
  c.zo.resident_blocks = 0         # stream: first N blocks kept on device
  c.zo.memory_kind = "pinned_host"  # stream: where the other blocks rest (or unpinned_host)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.eval_batch_size = 32
  c.train.eval_every = 0           # 0: only before and after training
  c.train.eval_at_start = True
  c.train.log_every = 1
  c.train.checkpoint_every = 50
  c.train.keep_checkpoints = 2
  c.train.halt_at_step = ml_collections.FieldReference(None, field_type=int)
  c.train.max_nonfinite_steps = 10  # more skipped steps than this stops the run
  c.train.progress = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = (("data", -1), ("model", 1))
  # Logical parameter axes -> mesh axes (MaxText-style); unnamed axes are replicated.
  c.mesh.rules = (("vocab", "model"), ("q_heads", "model"), ("kv_heads", "model"),
                  ("mlp", "model"), ("embed", None), ("layers", None))
  return c


def galore_settings() -> ml_collections.ConfigDict:
  """`optim.galore` for optim.name in galore_adamw / galore8bit / natural_galore (paper defaults)."""
  g = ml_collections.ConfigDict()
  g.rank = 128
  g.update_proj_gap = 200          # T: steps between projector refreshes
  g.scale = 0.25                   # projected leaves train at learning_rate * scale
  g.proj_type = "std"              # std / reverse_std / left / right / full
  g.projector = "svd"              # or "randomized" (warm-started subspace iteration)
  g.power_iters = 1                # randomized projector only
  g.moment_policy = "keep"         # keep / reset / reproject at a refresh
  g.stagger = False                # spread refreshes over the leaves
  g.history = 20                   # natural_galore: gradients in the Fisher ring buffer
  g.damping = 1e-3                 # natural_galore: lambda
  return g


def sentiment_task() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = "sentiment"
  t.split_seed = 0                 # the fixed train/dev/test split
  t.k = 16                         # examples per class (MeZO k-shot); 0: the whole train split
  t.kshot_seed = 0
  t.max_len = 64
  t.template = "{sentence} It was"
  t.label_words = (" terrible", " great")
  t.eval_splits = ("dev", "test")
  t.eval_limit = 0                 # >0: evaluate on the first N examples of each split
  return t


def corpus_task() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.name = "corpus"
  t.seq_len = 256
  t.val_fraction = 0.02            # held-out share of each source
  t.eval_limit = 64                # validation rows scored at each eval (0: all)
  t.vocab_limit = 0                # >0: ids mapped onto the most frequent (CPU pre-training)
  return t
