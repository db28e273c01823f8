"""Bad configs fail with one line naming the key, before any JAX work."""

import pytest

from zojax import run
from zojax.train import config as config_lib

CONFIG = "configs/sentiment_adamw.py:tiny"


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("nosuch.section.x=1", "nosuch"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("optim.learning_rate=-1", "optim.learning_rate"),
    ("model.init=magic", "model.init"),
    ("train.halt_at_step=999", "train.halt_at_step"),
    ("train.steps", "train.steps"),
    ("zo.eps=0", "zo.eps"),
    ("zo.direction=normal", "zo.direction"),
    ("model.attention=flash", "model.attention"),
])
def test_bad_override_names_the_key(override, key, capsys):
  config = "configs/sentiment_zo.py:tiny" if override.startswith("zo.") else CONFIG
  assert run.main(["--config", config, "--workdir", "/tmp/unused", override]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and key in err[0], err


def test_bad_config_path_and_arg(capsys):
  assert run.main(["--config", "configs/nope.py", "--workdir", "/tmp/unused"]) == 2
  assert "nope.py" in capsys.readouterr().err
  with pytest.raises(ValueError, match="bogus"):
    config_lib.load("configs/sentiment_adamw.py:bogus")


def test_overrides_apply_with_types():
  c = config_lib.load(CONFIG)
  config_lib.override(c, ["train.steps=7", "optim.learning_rate=1", "task.eval_splits=['test']",
                          "train.halt_at_step=3"])
  assert c.train.steps == 7 and c.optim.learning_rate == 1.0
  assert isinstance(c.optim.learning_rate, float)
  assert tuple(c.task.eval_splits) == ("test",) and c.train.halt_at_step == 3
  config_lib.validate(c)


def test_every_config_file_loads_and_validates():
  import pathlib
  for path in sorted(pathlib.Path("configs").glob("*.py")):
    if path.name in ("__init__.py", "common.py"):
      continue
    for arg in ("", "tiny"):
      config_lib.validate(config_lib.load(f"{path}:{arg}" if arg else str(path)))


def test_config_arg_booleans_parse_strictly():
  from configs import common
  for text, want in [("tiny", True), ("tiny=True", True), ("tiny=true", True), ("tiny=1", True),
                     ("tiny=False", False), ("tiny=false", False), ("tiny=0", False)]:
    assert common.parse_arg(text, tiny=not want).tiny is want, text
  # End to end: `:tiny=False` is the full config, not the tiny one.
  assert config_lib.load("configs/sentiment_zo.py:tiny=False").model.name != "tiny"
  assert config_lib.load("configs/sentiment_zo.py:tiny=True").model.name == "tiny"


@pytest.mark.parametrize("arg, key", [
    ("k=abc", "'k'"),
    ("lr=fast", "'lr'"),
    ("tiny=yes", "'tiny'"),
    ("tiny=False,steps", "'steps'"),   # a non-boolean arg needs a value
    ("bogus", "'bogus'"),
])
def test_bad_config_arg_names_the_field(arg, key, capsys):
  assert run.main(["--config", f"configs/sentiment_zo.py:{arg}", "--workdir", "/tmp/unused"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and key in err[0], err


def test_bad_config_arg_on_the_command_line_is_one_line(tmp_path):
  # What a user sees: no traceback, exit code 2 (the error comes before any JAX work).
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, "-m", "zojax.run", "--config", "configs/sentiment_zo.py:k=abc",
       "--workdir", str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr
  assert err[0].startswith("error:") and "'k'" in err[0] and "abc" in err[0], err
