"""Records galore-torch's GaLoreAdamW on a fixed gradient sequence, as a fixture for zojax's tests.

  /tmp/torchenv/bin/python experiments/galore_torch_reference.py   # writes the fixture

Needs `torch` and `galore-torch` (not zojax dependencies: install them in a throwaway venv).
galore-torch's package __init__ imports `transformers` (for a version check in its
Adafactor) and `bitsandbytes` (for its 8-bit AdamW); neither is used by `GaLoreAdamW`, so
they are stubbed when missing.

Writes tests/optim/data/galore_torch_adamw.npz with, for every projection type:
  grads_*            the gradient sequence fed to both implementations (float32)
  init_*             the initial parameters
  official_<type>_*  the parameters after each step, galore-torch as shipped
  canonical_<type>_* the same with the projector's singular-vector signs canonicalized the way
                     zojax does (largest-magnitude entry positive), so a run with kept moments
                     is comparable across refreshes too
The test (tests/optim/test_galore.py) replays the gradients through zojax.optim.galore_adamw.
"""

from __future__ import annotations

import pathlib
import sys
import types

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests/optim/data/galore_torch_adamw.npz"
# Two projected matrices (m >= n and m < n, so std and reverse_std take both sides) and a
# full-rank vector in its own group, as the paper's scripts pass embeddings/norms.
SHAPES = {"w_tall": (24, 16), "w_wide": (16, 24), "b": (16,)}
HPARAMS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=4,
               update_proj_gap=4, scale=0.25)
STEPS = 10
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def _stub_missing():
  """galore_torch/__init__ imports modules GaLoreAdamW does not use."""
  try:
    import transformers.utils.versions  # noqa: F401, PLC0415
  except ImportError:
    versions = types.ModuleType("transformers.utils.versions")
    versions.require_version = lambda *a, **k: None
    for name in ("transformers", "transformers.utils"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["transformers.utils.versions"] = versions
  try:
    import bitsandbytes.optim.optimizer  # noqa: F401, PLC0415
  except ImportError:
    mod = types.ModuleType("bitsandbytes.optim.optimizer")
    mod.Optimizer2State = object
    for name in ("bitsandbytes", "bitsandbytes.optim"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["bitsandbytes.optim.optimizer"] = mod


def gradient_sequence(seed: int = 0) -> dict[str, np.ndarray]:
  """Low-rank-plus-noise gradients with a decaying spectrum (well-separated singular values)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in SHAPES.items():
    if len(shape) == 1:
      out[name] = rng.standard_normal((STEPS, *shape)).astype(np.float32)
      continue
    m, n = shape
    k = min(m, n)
    seq = []
    for _ in range(STEPS):
      u, _ = np.linalg.qr(rng.standard_normal((m, k)))
      v, _ = np.linalg.qr(rng.standard_normal((n, k)))
      s = 2.0 ** (-np.arange(k) / 2.0)
      seq.append((u * s) @ v.T + 0.01 * rng.standard_normal((m, n)))
    out[name] = np.stack(seq).astype(np.float32)
  return out


def canonical_signs(torch, vectors, dim):
  idx = vectors.abs().argmax(dim=dim, keepdim=True)
  sign = torch.sign(torch.gather(vectors, dim, idx))
  return vectors * torch.where(sign == 0, torch.ones_like(sign), sign)


def run(proj_type: str, grads, init, canonical: bool):
  import torch  # noqa: PLC0415
  from galore_torch import GaLoreAdamW  # noqa: PLC0415
  from galore_torch.galore_projector import GaLoreProjector  # noqa: PLC0415

  original = GaLoreProjector.get_orthogonal_matrix

  def patched(self, weights, rank, type):  # noqa: A002  (galore-torch's argument name)
    out = original(self, weights, rank, type)
    if type == "left":
      return canonical_signs(torch, out, 0)
    if type == "right":
      return canonical_signs(torch, out, 1)
    return [canonical_signs(torch, out[0], 0), canonical_signs(torch, out[1], 1)]

  GaLoreProjector.get_orthogonal_matrix = patched if canonical else original
  try:
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
    h = HPARAMS
    groups = [
        {"params": [params["b"]]},
        {"params": [params["w_tall"], params["w_wide"]], "rank": h["rank"],
         "update_proj_gap": h["update_proj_gap"], "scale": h["scale"], "proj_type": proj_type},
    ]
    opt = GaLoreAdamW(groups, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                      weight_decay=h["weight_decay"], no_deprecation_warning=True)
    traj = {k: [] for k in params}
    for t in range(STEPS):
      for k, p in params.items():
        p.grad = torch.tensor(grads[k][t])
      opt.step()
      for k, p in params.items():
        traj[k].append(p.detach().numpy().copy())
    return {k: np.stack(v) for k, v in traj.items()}
  finally:
    GaLoreProjector.get_orthogonal_matrix = original


def main():
  _stub_missing()
  import torch  # noqa: PLC0415
  import galore_torch  # noqa: PLC0415, F401
  torch.set_num_threads(1)
  grads = gradient_sequence()
  rng = np.random.default_rng(1)
  init = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
  arrays = {f"grads_{k}": v for k, v in grads.items()}
  arrays.update({f"init_{k}": v for k, v in init.items()})
  for proj_type in PROJ_TYPES:
    for mode, canonical in (("official", False), ("canonical", True)):
      for k, v in run(proj_type, grads, init, canonical).items():
        arrays[f"{mode}_{proj_type}_{k}"] = v
  meta = dict(HPARAMS, steps=STEPS, torch=torch.__version__, galore_torch="1.0")
  arrays["meta"] = np.asarray(repr(meta))
  OUT.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT, **arrays)
  print(f'{{"fixture": "{OUT.name}", "bytes": {OUT.stat().st_size}, "torch": "{torch.__version__}"}}')


if __name__ == "__main__":
  main()
