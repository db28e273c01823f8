"""The README's "Notebook quickstart" code runs as printed, so it cannot drift from the API."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Notebook quickstart"


def python_blocks(text: str, heading: str) -> list[str]:
  """The ```python blocks between `heading` and the next level-2 heading."""
  start = text.index(heading) + len(heading)
  end = text.find("\n## ", start)
  section = text[start:] if end < 0 else text[start:end]
  return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


def test_extraction_stops_at_the_next_section():
  text = "## A\n```python\na = 1\n```\n## B\n```python\nb = 2\n```\n"
  assert python_blocks(text, "## A") == ["a = 1\n"]
  assert python_blocks(text, "## B") == ["b = 2\n"]


def test_quickstart_blocks_run_and_train():
  blocks = python_blocks(README.read_text(), SECTION)
  assert len(blocks) == 2, f"expected the GaLore and the ZO block, found {len(blocks)}"
  assert "galore_adamw" in blocks[0] and "zo.spsa" in blocks[1]
  scope: dict = {"__name__": "readme"}
  for block in blocks:  # in order, one namespace: the ZO block reuses the first's module
    exec(compile(block, f"{README.name}:{SECTION}", "exec"), scope)
  # The snippets assert this themselves; checked here too in case an edit drops the asserts.
  assert scope["losses"][-1] < 0.5 * scope["losses"][0]
  assert sum(scope["zo_losses"][-20:]) < sum(scope["zo_losses"][:20])
