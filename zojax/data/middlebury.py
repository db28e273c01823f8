"""One real frame for zero-shot depth: Middlebury 2014 Motorcycle, from scikit-image's wheel.

scikit-image ships the left and right views of the Motorcycle scene down-sampled 4x
(741x500) with the left view's ground-truth disparity (`skimage.data.stereo_motorcycle`;
files `skimage/data/motorcycle_left.png` and `motorcycle_disp.npz`, inside the 0.26 wheel).
zojax reads those files from the fetched wheel (asset "scikit-image", `python -m
zojax.data.fetch scikit-image`) and never imports scikit-image.

Depth is Z = f * B / (d + doffs), with the calibration stated in `stereo_motorcycle`'s
docstring for the down-sampled frame (the 2014 `calib.txt` values divided by 4):
f = 994.978 px, B = 193.001 mm, doffs = 31.086 px (the principal points' x offset).
Disparity is `inf` (never NaN in this file, but NaN is handled alike) where there is no
ground truth: 7.3% of pixels. The finite depths span 1.9-5.0 m.

Example:
  >>> m = motorcycle(96, 128)
  >>> m["image"].shape, m["depth"].shape, m["valid"].mean()   # (96, 128, 3), (96, 128), ~0.93
"""

from __future__ import annotations

import numpy as np

from zojax.data import fetch, rgbd
from zojax.errors import ConfigError

F_PX = 994.978
BASELINE_M = 0.193001
DOFFS_PX = 31.086
PRINCIPAL_POINT = (311.193, 254.877)  # (cx, cy) px
SOURCE_SIZE = (500, 741)
_LEFT = "skimage/data/motorcycle_left.png"
_DISPARITY = "skimage/data/motorcycle_disp.npz"


def load() -> tuple[np.ndarray, np.ndarray]:
  """The left view, uint8 [500, 741, 3], and its disparity, float32 [500, 741] px."""
  import matplotlib.image  # a dependency already; reads PNG without pyplot
  root = fetch.fetch("scikit-image")
  for name in (_LEFT, _DISPARITY):
    if not (root / name).exists():
      raise fetch.AssetError(f"asset 'scikit-image': {name} is missing from {root}; delete "
                             f"it and run `{fetch.FETCH_COMMAND} scikit-image`")
  image = matplotlib.image.imread(root / _LEFT)  # float32 in [0, 1]
  image = np.round(image[..., :3] * 255).astype(np.uint8)
  with np.load(root / _DISPARITY) as z:
    disparity = z["arr_0"].astype(np.float32)
  return image, disparity


def depth_from_disparity(disparity: np.ndarray) -> np.ndarray:
  """Z = f * B / (d + doffs) in metres, float32; 0 where d is NaN/inf or Z is outside
  [rgbd.MIN_DEPTH, rgbd.MAX_DEPTH]."""
  d = np.asarray(disparity, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    z = F_PX * BASELINE_M / (d + DOFFS_PX)
  z[~(np.isfinite(z) & (z >= rgbd.MIN_DEPTH) & (z <= rgbd.MAX_DEPTH))] = 0.0
  return z.astype(np.float32)


def _crop(height: int, width: int) -> tuple[int, int, int, int]:
  """The centred window of the source with the target's aspect: (top, bottom, left, right)."""
  h, w = SOURCE_SIZE
  if w * height > h * width:          # source wider: drop columns
    cw = round(h * width / height)
    left = (w - cw) // 2
    return 0, h, left, left + cw
  ch = round(w * height / width)
  top = (h - ch) // 2
  return top, top + ch, 0, w


def motorcycle(height: int = rgbd.HEIGHT, width: int = rgbd.WIDTH) -> dict:
  """The frame at `height` x `width`: centre-cropped to that aspect, then resized.

  The crop keeps all 500 rows and the middle columns (667 of 741 at 4:3, columns
  [37, 704)). The image is resized with an antialiased linear filter; depth takes the
  nearest source pixel (each output pixel centre's), so no depth is blended across an
  occlusion edge and invalid pixels stay invalid.

  Returns:
    ``image`` float32 [H, W, 3] in [0, 1]; ``depth`` float32 [H, W] metres, 0 where invalid;
    ``valid`` bool [H, W]; ``info``: calibration, crop, intrinsics at this size (OpenCV
    convention), valid fraction and depth range.

  Raises:
    ConfigError: a size that is not a positive multiple of 32.
    fetch.AssetError: the scikit-image wheel is missing and cannot be fetched (one line).
  """
  for name, v in (("height", height), ("width", width)):
    if not isinstance(v, (int, np.integer)) or v < 32 or v % 32:
      raise ConfigError(f"middlebury.motorcycle: {name}={v!r} must be a positive multiple of 32")
  import jax  # resizing only; jax.image's antialiased filter does what a hand-rolled one would

  image, disparity = load()
  top, bottom, left, right = _crop(height, width)
  crop = image[top:bottom, left:right].astype(np.float32) / 255.0
  resized = np.asarray(jax.image.resize(crop, (height, width, 3), "linear", antialias=True))
  rows = top + ((np.arange(height) + 0.5) * (bottom - top) / height).astype(int)
  cols = left + ((np.arange(width) + 0.5) * (right - left) / width).astype(int)
  depth = depth_from_disparity(disparity)[np.ix_(rows, cols)]
  sy, sx = height / (bottom - top), width / (right - left)
  cx, cy = PRINCIPAL_POINT
  valid = depth > 0
  info = {"scene": "Middlebury 2014 Motorcycle, left view, 1/4 resolution (scikit-image 0.26.0)",
          "calibration": {"f_px": F_PX, "baseline_m": BASELINE_M, "doffs_px": DOFFS_PX,
                          "cx_px": cx, "cy_px": cy},
          "source_size": list(SOURCE_SIZE), "crop": [top, bottom, left, right],
          "intrinsics": [F_PX * sx, F_PX * sy, (cx - left + 0.5) * sx - 0.5,
                         (cy - top + 0.5) * sy - 0.5],
          "valid_fraction": float(valid.mean()),
          "depth_range": [float(depth[valid].min()), float(depth[valid].max())]}
  return {"image": np.clip(resized, 0.0, 1.0).astype(np.float32), "depth": depth,
          "valid": valid, "info": info}
