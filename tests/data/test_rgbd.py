"""Rendered RGB-D rooms: metric depth from the buffer, camera geometry, determinism, cache."""

import json

import numpy as np
import pytest

from zojax.data import fetch, rgbd
from zojax.errors import ConfigError

# The renderer is the fetched pybullet wheel (CPython 3.11, x86-64 Linux).
pytestmark = [pytest.mark.assets,
              pytest.mark.skipif(rgbd.renderer_unsupported() is not None,
                                 reason=str(rgbd.renderer_unsupported()))]


@pytest.fixture(scope="module")
def renderer():
  with rgbd.Renderer() as r:
    yield r


@pytest.fixture(scope="module")
def three():
  """Rooms 0..2 of the train split, seed 0, rendered once for the module."""
  return rgbd.render("train", range(3), seed=0)


def _wall(r, distance):
  """A grey wall, the plane x = distance, 10 m x 10 m; camera at (0, 0, 1.5)."""
  r.reset()
  r.box((distance + 0.05, 0.0, 1.5), (0.05, 5.0, 5.0), (0.7, 0.7, 0.7))
  return np.array([0.0, 0.0, 1.5])


@pytest.mark.parametrize("distance", [0.8, 2.5, 7.0])
def test_wall_facing_the_camera_reads_its_distance_everywhere(renderer, distance):
  eye = _wall(renderer, distance)
  _, depth = renderer.capture(eye, rgbd.camera_rotation(0.0, 0.0))
  # The buffer is float32 and 1 - buffer ~ near / z, so z carries a relative error of up
  # to (z / near) * 2^-23: 0.06 mm at 7 m.
  np.testing.assert_allclose(depth, distance, rtol=distance / rgbd.NEAR * 2**-23)


def _pinhole_depth(k, eye, rotation, distance, shift=(0.0, 0.0)):
  """z-depth of the plane x = distance per pixel, from the intrinsics alone."""
  v, u = np.mgrid[:rgbd.HEIGHT, :rgbd.WIDTH] + np.reshape(shift[::-1], (2, 1, 1))
  ray_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones(u.shape)], -1)
  ray_world = ray_cam @ rotation.T          # world direction per unit of z-depth
  return (distance - eye[0]) / ray_world[..., 0]


@pytest.mark.parametrize("yaw, pitch, roll", [(0.4, 0.0, 0.0), (0.0, -0.4, 0.0),
                                              (0.3, -0.25, 0.05)])
def test_turned_camera_matches_pinhole_geometry(renderer, yaw, pitch, roll):
  """Per-pixel z-depth of a wall seen by a turned camera: pins the intrinsics to the pixel
  (depth on a plane varies along one image direction, hence the yaw-only and pitch-only
  cases), the row order and the axes."""
  distance = 3.0
  eye = _wall(renderer, distance)
  rotation = rgbd.camera_rotation(yaw, pitch, roll)
  _, depth = renderer.capture(eye, rotation)
  expected = _pinhole_depth(renderer.k, eye, rotation, distance)
  np.testing.assert_allclose(depth, expected, rtol=2e-4)
  # Negative controls: half a pixel off, or the rows read upside down, fail the tolerance.
  shift = (0.5, 0.0) if yaw else (0.0, 0.5)
  half = _pinhole_depth(renderer.k, eye, rotation, distance, shift)
  assert np.abs(depth / half - 1).max() > 5 * 2e-4
  if pitch:
    assert np.abs(depth[::-1] / expected - 1).max() > 0.05


def test_depth_outside_the_valid_range_is_zero(renderer):
  eye = _wall(renderer, 11.0)          # beyond MAX_DEPTH = 10 m, inside the far plane
  _, depth = renderer.capture(eye, rgbd.camera_rotation(0.0, 0.0))
  assert (depth == 0).all()
  renderer.reset()                     # nothing at all: the far plane
  _, depth = renderer.capture(eye, rgbd.camera_rotation(0.0, 0.0))
  assert (depth == 0).all()


def test_intrinsics_and_eigen_crop_scale_from_nyu():
  k = rgbd.intrinsics(480, 640)
  np.testing.assert_allclose(k[[0, 1, 0, 1], [0, 1, 2, 2]], rgbd.NYU_INTRINSICS)
  k = rgbd.intrinsics(96, 128)
  np.testing.assert_allclose(k[[0, 1, 0, 1], [0, 1, 2, 2]],
                             [103.76, 103.9, 64.72, 50.34], atol=1e-9)  # (c + .5) * .2 - .5
  assert rgbd.eigen_crop(480, 640) == rgbd.EIGEN_CROP
  assert rgbd.eigen_crop(96, 128) == (9, 94, 8, 120)
  mask = rgbd.eigen_mask(96, 128)
  assert mask.sum() == 85 * 112 and mask[9, 8] and not mask[8, 8] and not mask[9, 120]


def test_rooms_are_plausible(three):
  image, depth = three["image"], three["depth"]
  assert image.shape == (3, 96, 128, 3) and image.dtype == np.uint8
  assert depth.shape == (3, 96, 128) and depth.dtype == np.float32
  valid = depth > 0
  assert valid.mean() > 0.95
  assert depth[valid].min() >= rgbd.MIN_DEPTH and depth.max() <= rgbd.MAX_DEPTH
  for i in range(3):   # a room, not a flat wall: depth and colour both vary
    assert np.ptp(depth[i][valid[i]]) > 0.5 and image[i].std() > 10


def test_same_seed_same_images_in_any_order(three):
  again = rgbd.render("train", [2, 0], seed=0)   # a fresh renderer, other order
  np.testing.assert_array_equal(again["image"], three["image"][[2, 0]])
  np.testing.assert_array_equal(again["depth"], three["depth"][[2, 0]])


def test_other_seed_or_split_differs(three):
  other_seed = rgbd.render("train", [0], seed=1)
  other_split = rgbd.render("test", [0], seed=0)
  for other in (other_seed, other_split):
    assert not np.array_equal(other["image"][0], three["image"][0])
    assert not np.array_equal(other["depth"][0], three["depth"][0])


def test_cache_renders_once_and_rerenders_a_corrupt_chunk(tmp_path, monkeypatch, three):
  (tmp_path / "pybullet").symlink_to(fetch.fetch("pybullet"))  # the renderer stays cached
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  first = rgbd.rooms("train", 2, seed=0)
  assert first["rendered"] == 2 and first["seconds"] > 0
  np.testing.assert_array_equal(first["image"], three["image"][:2])
  second = rgbd.rooms("train", 2, seed=0)
  assert second["rendered"] == 0
  np.testing.assert_array_equal(second["depth"], first["depth"])
  (chunk,) = rgbd.cache_dir().glob("train-*.npz")
  meta = json.loads(chunk.with_suffix(".json").read_text())
  assert meta["sha256"] == fetch.sha256_of(chunk) and meta["count"] == 2
  data = bytearray(chunk.read_bytes())
  data[len(data) // 2] ^= 0xFF
  chunk.write_bytes(bytes(data))
  third = rgbd.rooms("train", 2, seed=0)
  assert third["rendered"] == 2
  np.testing.assert_array_equal(third["image"], first["image"])


def test_size_check_names_the_key():
  rgbd.check_size(96, 128)
  with pytest.raises(ConfigError, match=r"'task.image_height'=100 must be a positive multiple of 32"):
    rgbd.check_size(100, 128)
  with pytest.raises(ConfigError, match="'task.image_width'"):
    rgbd.check_size(96, 0)


def test_missing_renderer_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  monkeypatch.setattr(rgbd, "_PYBULLET", None)
  monkeypatch.setattr(fetch, "_download_command", lambda a, d: ["no-such-pip"])
  with pytest.raises(fetch.AssetError) as e:
    rgbd.load_pybullet()
  msg = str(e.value)
  assert "\n" not in msg and "python -m zojax.data.fetch pybullet" in msg


def test_task_batches_follow_the_contract(tmp_path, monkeypatch, three):
  from zojax.data import tasks
  (tmp_path / "pybullet").symlink_to(fetch.fetch("pybullet"))
  monkeypatch.setenv("ZOJAX_DATA", str(tmp_path))
  cfg = rgbd.task_config(num_train=3, num_test=2)
  task = tasks.build(cfg, batch_size=2, seed=0)
  assert task.name == "rgbd_rooms" and task.info["sizes"] == {"train": 3, "test": 2}
  assert task.info["render_seconds"]["train"] > 0 and task.info["eigen_crop"] == [9, 94, 8, 120]
  batch = task.train_batch(0)
  assert set(batch) == {"image", "depth"}
  assert batch["image"].shape == (2, 96, 128, 3) and batch["image"].dtype == np.float32
  assert batch["depth"].shape == (2, 96, 128) and batch["depth"].dtype == np.float32
  idx = tasks.batching.batch_indices(3, 2, seed=0, step=0)
  np.testing.assert_array_equal(batch["image"], three["image"][idx] / np.float32(255))
  np.testing.assert_array_equal(batch["depth"], three["depth"][idx])
  (test_batch,) = list(tasks.eval_batches(task.eval_sets["test"], 4))
  assert set(test_batch) == {"image", "depth", "eval_mask", "weight"}
  np.testing.assert_array_equal(test_batch["weight"], [1, 1, 0, 0])
  assert test_batch["eval_mask"].dtype == np.float32
  np.testing.assert_array_equal(test_batch["eval_mask"][0], rgbd.eigen_mask())
  assert 0 <= test_batch["image"].min() and test_batch["image"].max() <= 1


def test_task_config_errors_name_the_key():
  from zojax.data import tasks
  with pytest.raises(ConfigError, match=r"^config key 'task.image_width'=120 must be"):
    tasks.build(rgbd.task_config(image_width=120), batch_size=2, seed=0)
  with pytest.raises(ConfigError, match=r"^config key 'task.num_test'=0"):
    tasks.build(rgbd.task_config(num_test=0), batch_size=2, seed=0)
