"""The Middlebury motorcycle frame: depth from disparity, crop and resize, one-line errors."""

import numpy as np
import pytest

from zojax.data import fetch, middlebury
from zojax.errors import ConfigError


@pytest.fixture(scope="module")
def small():
  return middlebury.motorcycle(96, 128)


def test_depth_from_disparity_by_hand():
  z = middlebury.depth_from_disparity(np.array([np.inf, np.nan, 60.0, 0.0, -40.0]))
  # 994.978 px * 0.193001 m / (60 + 31.086) px; d = 0 is a point at f * B / doffs.
  np.testing.assert_allclose(z, [0, 0, 2.1082466, 6.1774351, 0], rtol=1e-6)


@pytest.mark.assets
def test_raw_files_from_the_wheel():
  image, disparity = middlebury.load()
  assert image.shape == (500, 741, 3) and image.dtype == np.uint8
  assert disparity.shape == (500, 741)
  invalid = ~np.isfinite(disparity)
  assert 0.07 < invalid.mean() < 0.08           # the file's inf pixels
  depth = middlebury.depth_from_disparity(disparity)
  np.testing.assert_array_equal(depth > 0, ~invalid)
  assert 1.9 < depth[~invalid].min() and depth.max() < 5.1


@pytest.mark.assets
def test_motorcycle_at_model_size(small):
  assert small["image"].shape == (96, 128, 3) and small["image"].dtype == np.float32
  assert small["depth"].shape == (96, 128) and small["depth"].dtype == np.float32
  assert small["valid"].dtype == bool
  np.testing.assert_array_equal(small["valid"], small["depth"] > 0)
  assert 0.9 < small["valid"].mean() < 0.97
  assert 0 <= small["image"].min() and small["image"].max() <= 1
  assert small["info"]["crop"] == [0, 500, 37, 704]   # 4:3 keeps 667 middle columns
  assert small["info"]["calibration"]["doffs_px"] == 31.086


@pytest.mark.assets
def test_depth_is_the_nearest_source_pixel_and_image_the_crop():
  image, disparity = middlebury.load()
  raw = middlebury.depth_from_disparity(disparity)
  m = middlebury.motorcycle(480, 640)
  top, bottom, left, right = m["info"]["crop"]
  for i, j in [(0, 0), (240, 320), (479, 639), (123, 456)]:
    src = (top + int((i + 0.5) * (bottom - top) / 480), left + int((j + 0.5) * (right - left) / 640))
    assert m["depth"][i, j] == raw[src]
  crop = image[top:bottom, left:right] / 255.0
  np.testing.assert_allclose(m["image"].mean(axis=(0, 1)), crop.mean(axis=(0, 1)), atol=2e-3)
  # Negative control: the uncropped frame's mean colour is measurably different.
  assert np.abs(m["image"].mean(axis=(0, 1)) - image.mean(axis=(0, 1)) / 255.0).max() > 2e-3


def test_bad_size_is_one_line():
  with pytest.raises(ConfigError, match=r"^middlebury.motorcycle: height=100 must be a "
                                        r"positive multiple of 32$"):
    middlebury.motorcycle(100, 128)


def test_missing_asset_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: ["no-such-pip"])
  with pytest.raises(fetch.AssetError) as e:
    middlebury.motorcycle(96, 128)
  assert "\n" not in str(e.value)
  assert "python -m zojax.data.fetch scikit-image" in str(e.value)
