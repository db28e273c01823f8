"""iDisc monocular depth (`idisc`, Flax NNX) on rendered RGB-D rooms (`rgbd_rooms`).

  python -m zojax.run --config configs/depth_idisc.py --workdir runs/idisc
  python -m zojax.run --config configs/depth_idisc.py:tiny --workdir /tmp/idisc_tiny
  python -m zojax.run --config configs/depth_idisc.py:variant=baseline --workdir runs/idisc_base

Training follows the official NYU recipe, scaled to the CPU: AdamW at lr 2e-4, weight decay
0.02, OneCycle with cosine annealing (pct_start 0.3, div 1, final div 10) with b1 cycling
0.95 -> 0.85 -> 0.95, gradient clipping at global norm 1.0, the SIlog loss (x10). The
encoder trains from scratch at the same learning rate (the paper's lr/10 is for a
pretrained backbone, and there is none offline). Widths and the IDR dimension are CPU-sized
(see zojax/models/idisc.py); the structure is the paper's: 3 resolutions, 32 IDRs, 2 AFP
iterations sharing one layer, 2 ISD layers, 1 head.

Arg (comma-separated):
  tiny          a narrow net on 100 train / 100 test rooms, 20 steps: plumbing, CPU minutes.
  variant=V     idisc (default) | no_afp (ISD attends to the static priors) | baseline (same
                encoder + FPN, per-resolution MLP head, parameter count matched).
  idrs=N        IDRs per resolution (default 32).
  opt=NAME      adamw (default) | galore_adamw (attention and MLP kernels projected, rank 8).
  steps=T       training steps (0: the default, 3000; tiny 20).
  attention=I   ISD attention implementation: auto (default) | xla | blockwise | pallas.

Eval reports, per split: loss (per-image SIlog loss), d1 d2 d3 abs_rel sq_rel log10 (pooled
over valid pixels) and rmse rmse_log silog (per image); see zojax/depth/metrics.py.
experiments/depth_ablation.py runs the ablation table with this config.
"""

from configs import common
from zojax.data import rgbd

VARIANTS = ("idisc", "no_afp", "baseline")
OPTIMIZERS = ("adamw", "galore_adamw")
ATTENTION = ("auto", "xla", "blockwise", "pallas")


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, variant="idisc", idrs=32, opt="adamw", steps=0,
                         attention="auto")
  for key, allowed in (("variant", VARIANTS), ("opt", OPTIMIZERS), ("attention", ATTENTION)):
    if arg[key] not in allowed:
      raise ValueError(f"config arg {key}={arg[key]!r} is not one of {allowed}")
  c = common.base_config()
  c.task = rgbd.task_config()

  m = c.model
  m.name, m.init = "idisc", "random"
  m.variant = arg.variant
  m.widths = (16, 32, 64, 128)     # encoder channels at strides 4, 8, 16, 32
  m.blocks = (1, 1, 1, 1)          # residual blocks per stage
  m.pixel_dim = 32                 # FPN channels (ISD attention width, 1 head)
  m.idr_dim = 32                   # IDR dimension (paper: 128)
  m.num_idrs = arg.idrs            # per resolution (paper: 32)
  m.afp_iters = 2
  m.isd_layers = 2
  m.expansion = 2                  # MLP width / input width (paper: 4)
  m.groups = 8                     # GroupNorm groups
  m.baseline_hidden = 0            # 0: matched to iDisc's parameter count
  m.attention = arg.attention

  o = c.optim
  o.name = arg.opt
  o.learning_rate = 2e-4
  o.weight_decay = 0.02
  o.schedule = "onecycle"
  o.pct_start, o.div_factor, o.final_div_factor = 0.3, 1.0, 10.0
  o.b1, o.b1_min, o.b2, o.eps = 0.95, 0.85, 0.999, 1e-8
  o.grad_clip = 1.0
  o.galore = common.galore_settings()
  o.galore.rank = 8                # of [32, 32] .. [64, 32] kernels
  o.galore.update_proj_gap = 200
  o.galore.scale = 1.0             # the same step size as AdamW: only the projection differs

  t = c.train
  t.steps = arg.steps or 3000
  t.batch_size = 8
  t.eval_batch_size = 16
  t.eval_every = max(t.steps // 6, 1)
  t.checkpoint_every = max(t.steps // 6, 1)
  t.log_every = 10
  if arg.tiny:
    c.task.num_train, c.task.num_test = 100, 100   # the full set's first cached chunks
    m.widths, m.pixel_dim, m.idr_dim, m.groups = (8, 8, 16, 16), 16, 16, 4
    o.galore.rank, o.galore.update_proj_gap = 4, 5
    t.steps = arg.steps or 20
    t.eval_every = 0
    t.checkpoint_every = 10
    t.log_every = 1
  return c
