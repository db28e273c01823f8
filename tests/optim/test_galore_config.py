"""Configs select the GaLore family; bad settings are one-line config errors."""

import pytest

from zojax.train import config as config_lib
from zojax.train import optimizer


@pytest.mark.parametrize("opt", ["adamw", "adam8bit", "galore_adamw", "galore8bit",
                                 "natural_galore"])
def test_corpus_galore_config_builds_each_optimizer(opt):
  c = config_lib.load(f"configs/corpus_galore.py:tiny,opt={opt}")
  config_lib.validate(c)
  tx = optimizer.build(c.optim, c.train.steps)
  assert callable(tx.init) and not optimizer.is_zeroth_order(c.optim)


@pytest.mark.parametrize("key,value,match", [
    ("optim.galore.proj_type", "'sideways'", r"'optim.galore.proj_type'='sideways': must be one "
                                             r"of \('std', 'reverse_std', 'left', 'right', 'full'\)"),
    ("optim.galore.rank", "0", r"'optim.galore.rank'=0: must be positive"),
    ("optim.galore.projector", "'qr'", r"must be one of \('svd', 'randomized'\)"),
    ("optim.galore.moment_policy", "'reproject'", r"8-bit moments cannot be reprojected"),
])
def test_bad_galore_settings_are_config_errors(key, value, match):
  c = config_lib.load("configs/corpus_galore.py:tiny,opt=galore8bit")
  config_lib.override(c, [f"{key}={value}"])
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


@pytest.mark.parametrize("opt", ["galore_adamw", "galore8bit", "natural_galore"])
def test_sentiment_galore_config_is_the_adamw_fine_tune_with_galore(opt):
  c = config_lib.load(f"configs/sentiment_galore.py:k=512,steps=150,opt={opt}")
  config_lib.validate(c)
  base = config_lib.load("configs/sentiment_adamw.py:k=512,steps=150")
  # Only the optimizer differs from the AdamW fine-tune it is compared with.
  assert c.task.to_dict() == base.task.to_dict() and c.train.to_dict() == base.train.to_dict()
  assert (c.optim.name, c.optim.galore.rank, c.optim.galore.scale) == (opt, 8, 4.0)
  assert c.optim.learning_rate == base.optim.learning_rate
  assert not optimizer.is_zeroth_order(c.optim)


def test_sentiment_galore_config_rejects_an_unknown_optimizer():
  with pytest.raises(ValueError, match=r"opt='adamw' is not one of \('galore_adamw'"):
    config_lib.load("configs/sentiment_galore.py:opt=adamw")
