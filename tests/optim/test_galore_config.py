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
