"""SmolLM2-135M fine-tuned with GaLore-AdamW on Rotten Tomatoes (MeZO's k-shot protocol).

  python -m zojax.run --config configs/sentiment_galore.py:k=16,kshot_seed=0 --workdir runs/g16

The AdamW fine-tune of configs/sentiment_adamw.py (same data, steps, batch and lr) with the
attention and MLP kernels trained through GaLore. Rank and scale follow the GaLore paper's
GLUE fine-tuning (rank 8, scale 4: projected leaves train at lr * 4); embeddings, norms and
the tied head get full-rank AdamW at lr. T=200 is longer than these runs, so the projector is
the SVD of the first gradient (the paper refreshes every 500 steps on GLUE).

Variants: everything configs/sentiment_adamw.py takes (tiny, demo, k=N, kshot_seed=S,
steps=T), plus rank=R, scale=S, opt=galore_adamw|galore8bit|natural_galore.
"""

from configs import common
from configs import sentiment_adamw

OPTIMIZERS = ("galore_adamw", "galore8bit", "natural_galore")


def get_config(arg=None):
  arg = common.parse_arg(arg, tiny=False, demo=False, k=16, kshot_seed=0, steps=100, rank=8,
                         scale=4.0, opt="galore_adamw")
  if arg.opt not in OPTIMIZERS:
    raise ValueError(f"config arg opt={arg.opt!r} is not one of {OPTIMIZERS}")
  flags = [name for name in ("tiny", "demo") if arg[name]]
  c = sentiment_adamw.get_config(",".join(
      flags + [f"k={arg.k}", f"kshot_seed={arg.kshot_seed}", f"steps={arg.steps}"]))
  c.optim.name = arg.opt
  c.optim.galore = common.galore_settings()
  c.optim.galore.rank = 4 if arg.tiny else arg.rank
  c.optim.galore.scale = arg.scale
  c.optim.galore.update_proj_gap = 2 if arg.tiny else 200
  return c
