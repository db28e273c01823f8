"""Rendered RGB-D rooms for monocular depth: pybullet's TinyRenderer on the CPU.

Each example is one random room (textured floor, walls and ceiling, furniture against the
walls, tables, chairs and random objects on the floor and on the furniture) seen by a
camera at a NYU-like height (1.0-1.8 m) and pitch (about 11 degrees down), rendered at
the NYU v2 colour camera's intrinsics scaled to the image size. The depth is metric
z-depth (along the optical axis, as NYU's), from the renderer's depth buffer::

  z = far * near / (far - (far - near) * buffer)

and is 0 outside the valid range [MIN_DEPTH, MAX_DEPTH] = [0.01, 10] m. Colour is rendered
at twice the size and box-averaged (anti-aliasing); depth is rendered at the output size, so
each depth pixel is the surface seen through that pixel's centre, not a blend of two.

Every image is a pure function of (seed, split, index): its own numpy generator, and the
renderer reset before each room, so a chunk renders the same in any order or process.
Datasets are rendered once into $ZOJAX_DATA/rgbd_rooms/ in chunks of CHUNK images, each
with a sidecar holding its sha256; a chunk that is missing or fails its checksum is
rendered again. From the command line (resumable, stops starting chunks after --minutes)::

  python -m zojax.data.rgbd --train 3000 --test 300 --minutes 9

The renderer is the pybullet 3.2.7 wheel (asset "pybullet", `python -m zojax.data.fetch
pybullet`), loaded from the cache rather than installed; its meshes and textures come
from the wheel's pybullet_data, the rest of the textures are drawn here from a fixed seed.

Example:
  >>> data = rooms("test", 300, seed=0)          # cached after the first call
  >>> data["image"].shape, data["depth"].dtype   # uint8 [300, 96, 128, 3], float32
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

from zojax.data import fetch
from zojax.errors import ConfigError

log = logging.getLogger(__name__)

HEIGHT, WIDTH = 96, 128
# NYU Depth v2 colour camera at 640x480 (fx, fy, cx, cy), OpenCV convention: pixel centres
# at integer coordinates.
NYU_SIZE = (480, 640)
NYU_INTRINSICS = (518.8, 519.5, 325.6, 253.7)
# Eigen et al.'s evaluation crop on NYU 480x640: rows [45, 471), columns [41, 601). It
# drops the border that the Kinect's registration leaves unfilled; rendered images have no
# such border, but evaluation keeps the crop so numbers follow the NYU protocol.
EIGEN_CROP = (45, 471, 41, 601)
MIN_DEPTH, MAX_DEPTH = 0.01, 10.0
# Clip planes. Far lies beyond MAX_DEPTH so the valid range, not clipping, decides.
NEAR, FAR = MIN_DEPTH, 12.0
SUPERSAMPLE = 2
CHUNK = 100
SPLITS = {"train": 0, "test": 1}
# Bump when the scene generator changes: it names the cache directory.
GENERATOR_VERSION = 1
_SO_NAME = "pybullet.cpython-311-x86_64-linux-gnu.so"


def intrinsics(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  """NYU's camera matrix scaled to `height` x `width` (OpenCV convention), [3, 3] float64.

  Each axis scales by its own factor (s = width / 640, t = height / 480), with
  c' = (c + 0.5) * s - 0.5 so pixel centres stay centres; at 96x128, s = t = 0.2.
  """
  fx, fy, cx, cy = NYU_INTRINSICS
  s, t = width / NYU_SIZE[1], height / NYU_SIZE[0]
  return np.array([[fx * s, 0, (cx + 0.5) * s - 0.5],
                   [0, fy * t, (cy + 0.5) * t - 0.5],
                   [0, 0, 1]])


def eigen_crop(height: int = HEIGHT, width: int = WIDTH) -> tuple[int, int, int, int]:
  """`EIGEN_CROP` scaled to the image size and rounded: (top, bottom, left, right).

  At 96x128 it is rows [9, 94), columns [8, 120).
  """
  top, bottom, left, right = EIGEN_CROP
  t, s = height / NYU_SIZE[0], width / NYU_SIZE[1]
  return round(top * t), round(bottom * t), round(left * s), round(right * s)


def eigen_mask(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
  """bool [height, width], True inside the scaled Eigen crop."""
  top, bottom, left, right = eigen_crop(height, width)
  mask = np.zeros((height, width), bool)
  mask[top:bottom, left:right] = True
  return mask


def depth_from_buffer(buffer: np.ndarray, near: float = NEAR, far: float = FAR) -> np.ndarray:
  """Metric z-depth from a [0, 1] perspective depth buffer; 0 outside [MIN_DEPTH, MAX_DEPTH].

  z = far * near / (far - (far - near) * buffer), computed in float64.
  """
  b = np.asarray(buffer, np.float64)
  z = far * near / (far - (far - near) * b)
  z[~((z >= MIN_DEPTH) & (z <= MAX_DEPTH))] = 0.0
  return z.astype(np.float32)


def check_size(height: int, width: int, key: str = "task") -> None:
  """Image sizes must be positive multiples of 32 (the encoder's stride)."""
  for name, v in (("image_height", height), ("image_width", width)):
    if not isinstance(v, (int, np.integer)) or v < 32 or v % 32:
      raise ConfigError(f"config key '{key}.{name}'={v!r} must be a positive multiple of 32")


# ------------------------------------------------------------------------------------------
# The renderer


@contextlib.contextmanager
def _quiet():
  """Silences the C library's prints (build time, URDF warnings) on fds 1 and 2.

  Its errors still arrive, as Python exceptions raised after this returns.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  try:
    with open(os.devnull, "wb") as null:
      os.dup2(null.fileno(), 1)
      os.dup2(null.fileno(), 2)
    yield
  finally:
    _LIBC.fflush(None)  # C stdio buffers, or the text lands after the fds are restored
    for fd, copy in zip((1, 2), saved):
      os.dup2(copy, fd)
      os.close(copy)


_PYBULLET = None
_LIBC = ctypes.CDLL(None)


def renderer_unsupported() -> str | None:
  """Why the fetched renderer cannot load in this interpreter, or None if it can."""
  here = (sys.implementation.name, sys.version_info[:2], sys.platform, platform.machine())
  if here == ("cpython", (3, 11), "linux", "x86_64"):
    return None
  return (f"rgbd: the renderer (asset 'pybullet': pybullet 3.2.7, whose newest wheel is for "
          f"CPython 3.11 on x86-64 Linux) cannot load in {here[0]} "
          f"{'.'.join(map(str, here[1]))} on {here[2]}/{here[3]}; render the rooms with "
          f"Python 3.11 on x86-64 Linux (they are cached)")


def load_pybullet():
  """The pybullet module from the fetched wheel (asset "pybullet"), imported once.

  Raises:
    fetch.AssetError: one line, when the wheel cannot be fetched or cannot run here.
  """
  global _PYBULLET
  if _PYBULLET is not None:
    return _PYBULLET
  if why := renderer_unsupported():
    raise fetch.AssetError(why)
  so = fetch.fetch("pybullet") / _SO_NAME
  if not so.exists():
    raise fetch.AssetError(f"rgbd: {so} is missing; delete {so.parent} and run "
                           f"`{fetch.FETCH_COMMAND} pybullet`")
  spec = importlib.util.spec_from_file_location("pybullet", so)
  with _quiet():  # an extension module runs its init (which prints) in module_from_spec
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  _PYBULLET = module
  return module


def camera_rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
  """World-from-camera rotation, [3, 3], columns = the camera's (right, down, forward).

  World z is up; yaw turns about it (0 looks along +x), pitch > 0 looks up, roll turns
  about the optical axis. The camera axes follow OpenCV (x right, y down, z forward).
  """
  cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
  forward = np.array([cp * cy, cp * sy, sp])
  right = np.array([sy, -cy, 0.0])
  down = np.cross(forward, right)
  cr, sr = np.cos(roll), np.sin(roll)
  return np.stack([cr * right + sr * down, -sr * right + cr * down, forward], axis=1)


def _gl_matrices(eye, rotation, height, width):
  """pybullet's (column-major) view and projection matrices for `intrinsics(height, width)`.

  TinyRenderer samples pixel (row v, column u) at window coordinates x = u, y = H - 1 - v
  (pixel corners, rows flipped), not at the +0.5 centres OpenGL uses; the principal point
  is shifted to match, which `test_tilted_camera_matches_pinhole_geometry` pins.
  """
  r_gl = rotation * np.array([1.0, -1.0, -1.0])  # OpenGL camera: x right, y up, z back
  view = np.eye(4)
  view[:3, :3] = r_gl.T
  view[:3, 3] = -r_gl.T @ np.asarray(eye, np.float64)
  k = intrinsics(height, width)
  fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2], k[1, 2] + 1.0
  proj = np.array([
      [2 * fx / width, 0, 1 - 2 * cx / width, 0],
      [0, 2 * fy / height, 2 * cy / height - 1, 0],
      [0, 0, -(FAR + NEAR) / (FAR - NEAR), -2 * FAR * NEAR / (FAR - NEAR)],
      [0, 0, -1, 0]])
  return view.T.reshape(-1).tolist(), proj.T.reshape(-1).tolist()


class Light(NamedTuple):
  direction: tuple[float, float, float] = (0.3, 0.2, 1.0)
  color: tuple[float, float, float] = (1.0, 1.0, 1.0)
  ambient: float = 0.6
  diffuse: float = 0.4
  specular: float = 0.05


class Renderer:
  """One DIRECT pybullet client and the texture bank; build a scene, then `capture`.

  Example:
    >>> with Renderer() as r:
    ...   r.reset()
    ...   r.box((2.55, 0, 1), (0.05, 5, 5), (0.8, 0.8, 0.8))
    ...   rgb, depth = r.capture((0, 0, 1), camera_rotation(0.0, 0.0))   # depth == 2.5
  """

  def __init__(self, height: int = HEIGHT, width: int = WIDTH):
    self.p = load_pybullet()
    self.height, self.width = height, width
    self.k = intrinsics(height, width)
    self.client = self.p.connect(self.p.DIRECT)
    self.data = fetch.fetch("pybullet") / "pybullet_data"
    self._texture_files = _texture_files(str(self.data))
    self._textures: dict[int, int] = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    if self.client is not None:
      self.p.disconnect(physicsClientId=self.client)
      self.client = None

  def reset(self) -> None:
    """Empties the scene, textures included, so no state carries from one room to the next."""
    self.p.resetSimulation(physicsClientId=self.client)
    self._textures = {}

  def texture(self, i: int) -> int:
    """pybullet's id of bank texture `i`, loaded on first use since the last reset."""
    if i not in self._textures:
      self._textures[i] = self.p.loadTexture(self._texture_files[i],
                                             physicsClientId=self.client)
    return self._textures[i]

  def _body(self, visual, position=(0, 0, 0), yaw=0.0, texture=None, rgba=None) -> int:
    p, c = self.p, self.client
    body = p.createMultiBody(0, -1, visual, basePosition=list(position),
                             baseOrientation=p.getQuaternionFromEuler([0, 0, yaw]),
                             physicsClientId=c)
    kw = {}
    if texture is not None:
      kw["textureUniqueId"] = self.texture(int(texture))
    if rgba is not None:
      kw["rgbaColor"] = list(rgba)
    if kw:
      p.changeVisualShape(body, -1, physicsClientId=c, **kw)
    return body

  def quad(self, center, a, b, size, tile, texture, rgb=(1, 1, 1)) -> int:
    """A textured rectangle spanning `size` along unit vectors a, b; it faces a x b.

    The texture repeats every `tile` metres.
    """
    c, a, b = (np.asarray(v, np.float64) for v in (center, a, b))
    w, h = size
    corners = [c - a * w / 2 - b * h / 2, c + a * w / 2 - b * h / 2,
               c + a * w / 2 + b * h / 2, c - a * w / 2 + b * h / 2]
    uv = [[0, 0], [w / tile, 0], [w / tile, h / tile], [0, h / tile]]
    normal = np.cross(a, b).tolist()
    visual = self.p.createVisualShape(
        self.p.GEOM_MESH, vertices=[v.tolist() for v in corners], indices=[0, 1, 2, 0, 2, 3],
        uvs=uv, normals=[normal] * 4, physicsClientId=self.client)
    return self._body(visual, texture=texture, rgba=(*rgb, 1))

  def box(self, center, half_extents, rgb, yaw=0.0, texture=None) -> int:
    visual = self.p.createVisualShape(self.p.GEOM_BOX, halfExtents=list(half_extents),
                                      physicsClientId=self.client)
    return self._body(visual, center, yaw, texture, (*rgb, 1))

  def load(self, relpath: str, position, yaw=0.0, scale=1.0) -> int:
    """A URDF (or SDF) from pybullet_data; returns its body id."""
    p, c = self.p, self.client
    path = str(self.data / relpath)
    with _quiet():
      if relpath.endswith(".sdf"):
        body = p.loadSDF(path, globalScaling=scale, physicsClientId=c)[0]
        p.resetBasePositionAndOrientation(body, list(position),
                                          p.getQuaternionFromEuler([0, 0, yaw]),
                                          physicsClientId=c)
      else:
        body = p.loadURDF(path, list(position), p.getQuaternionFromEuler([0, 0, yaw]),
                          globalScaling=scale, useFixedBase=True, physicsClientId=c)
    return body

  def aabb(self, body: int) -> tuple[np.ndarray, np.ndarray]:
    """The body's axis-aligned bounds over all links (collision shapes)."""
    p, c = self.p, self.client
    lo, hi = (np.asarray(v) for v in p.getAABB(body, -1, physicsClientId=c))
    for link in range(p.getNumJoints(body, physicsClientId=c)):
      l2, h2 = p.getAABB(body, link, physicsClientId=c)
      lo, hi = np.minimum(lo, l2), np.maximum(hi, h2)
    return lo, hi

  def move(self, body: int, delta) -> None:
    p, c = self.p, self.client
    pos, orn = p.getBasePositionAndOrientation(body, physicsClientId=c)
    p.resetBasePositionAndOrientation(body, (np.asarray(pos) + delta).tolist(), orn,
                                      physicsClientId=c)

  def capture(self, eye, rotation, light: Light = Light()) -> tuple[np.ndarray, np.ndarray]:
    """Renders the scene from `eye` with world-from-camera `rotation`.

    Returns:
      rgb uint8 [H, W, 3] (rendered at SUPERSAMPLE x the size, box-averaged) and z-depth
      float32 [H, W] in metres, 0 outside [MIN_DEPTH, MAX_DEPTH].
    """
    p, h, w, s = self.p, self.height, self.width, SUPERSAMPLE
    light_kw = dict(lightDirection=list(light.direction), lightColor=list(light.color),
                    lightAmbientCoeff=light.ambient, lightDiffuseCoeff=light.diffuse,
                    lightSpecularCoeff=light.specular, shadow=0)
    shot = lambda hh, ww: p.getCameraImage(
        ww, hh, *_gl_matrices(eye, rotation, hh, ww), renderer=p.ER_TINY_RENDERER,
        flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.client, **light_kw)
    # Each s x s block of the big image is centred on its small pixel's centre, because
    # the big image's intrinsics are the same camera scaled.
    rgba = shot(h * s, w * s)[2]
    rgb = np.asarray(rgba, np.float32).reshape(h, s, w, s, 4)[..., :3].mean(axis=(1, 3))
    depth = depth_from_buffer(np.asarray(shot(h, w)[3]).reshape(h, w))
    return np.round(rgb).astype(np.uint8), depth


# ------------------------------------------------------------------------------------------
# Textures


_SHIPPED_TEXTURES = ("checker_grid.jpg", "tex256.png", "uvmap.png", "table/table.png",
                     "tray/tray.jpg", "jenga/jenga.png", "checker_blue.png")
_TEXTURE_SEED = 1234
_TEX = 128


def _smooth(rng, cells: int, size: int = _TEX) -> np.ndarray:
  """Tileable smooth noise in [0, 1]: a coarse random grid, upsampled and blurred."""
  x = np.kron(rng.uniform(size=(cells, cells)), np.ones((size // cells, size // cells)))
  r = size // cells // 2
  for axis in (0, 1):  # wrapped box blur, twice: a tent filter
    for _ in range(2):
      x = sum(np.roll(x, d, axis) for d in range(-r, r + 1)) / (2 * r + 1)
  return (x - x.min()) / (np.ptp(x) + 1e-9)


def _palette(rng, n: int, spread: float) -> np.ndarray:
  """n colours around one random base colour, desaturated towards grey like most rooms."""
  base = rng.uniform(0.15, 0.95, 3)
  base = base.mean() + rng.uniform(0.2, 0.8) * (base - base.mean())
  return np.clip(base + rng.normal(0, spread, (n, 3)), 0, 1)


def _planks(rng):
  rows = int(rng.integers(3, 7))
  colours = _palette(rng, rows, 0.06)
  y = np.arange(_TEX)[:, None] * rows // _TEX
  grain = 0.85 + 0.15 * np.sin(np.arange(_TEX)[None, :] / rng.uniform(2, 6)
                               + 6 * _smooth(rng, 8))
  img = colours[y % rows][:, :, :] * grain[..., None]
  img[(np.arange(_TEX) % (_TEX // rows)) == 0] *= 0.5  # the gaps between planks
  return img


def _tiles(rng):
  n = int(rng.choice([2, 4, 8]))
  colours = _palette(rng, 2, 0.25 * rng.uniform())
  yy, xx = np.mgrid[:_TEX, :_TEX] * n // _TEX
  img = colours[(yy + xx) % 2] * (0.92 + 0.08 * _smooth(rng, 16))[..., None]
  grout = ((np.arange(_TEX) % (_TEX // n)) < 2)
  img[grout] = img[:, grout] = rng.uniform(0.5, 0.9)
  return img


def _stripes(rng):
  n = int(rng.choice([4, 8, 16]))
  colours = _palette(rng, 2, 0.15)
  x = np.arange(_TEX) * n // _TEX
  return np.broadcast_to(colours[x % 2][None], (_TEX, _TEX, 3)).copy()


def _plaster(rng):
  colour = _palette(rng, 1, 0.0)[0] * 0.3 + 0.65
  return colour * (0.85 + 0.15 * _smooth(rng, int(rng.choice([8, 16, 32]))))[..., None]


def _bricks(rng):
  rows = int(rng.choice([8, 16]))
  colours = _palette(rng, 8, 0.08)
  yy, xx = np.mgrid[:_TEX, :_TEX]
  row = yy * rows // _TEX
  col = (xx + (row % 2) * (_TEX // 8)) * 4 // _TEX
  img = colours[(row * 3 + col) % 8]
  img[(yy % (_TEX // rows)) < 2] = 0.8
  img[((xx + (row % 2) * (_TEX // 8)) % (_TEX // 4)) < 2] = 0.8
  return img


def _fabric(rng):
  colour = _palette(rng, 1, 0.0)[0]
  weave = 0.9 + 0.1 * np.sin(np.arange(_TEX)[:, None] * 1.7) * np.sin(np.arange(_TEX) * 1.7)
  return colour * (weave * (0.8 + 0.2 * _smooth(rng, 32)))[..., None]


_KINDS = (_planks, _tiles, _stripes, _plaster, _bricks, _fabric)
_PER_KIND = 6


def _shrink(img: np.ndarray, size: int = _TEX) -> np.ndarray:
  """Area-averages an [H, W, C] image to [size, size, C]."""
  for axis in (0, 1):
    edges = np.linspace(0, img.shape[axis], size + 1).astype(int)
    shape = [1, 1, 1]
    shape[axis] = size
    img = np.add.reduceat(img, edges[:-1], axis=axis) / np.diff(edges).reshape(shape)
  return img


def texture_bank(data: pathlib.Path, seed: int = _TEXTURE_SEED) -> list[np.ndarray]:
  """Every texture rooms use, uint8 [128, 128, 3]: `_PER_KIND` procedural ones of each kind
  (drawn from `seed`), then `_SHIPPED_TEXTURES` from pybullet_data (`data`), shrunk."""
  import matplotlib.image  # a dependency already; reads JPEG and PNG without pyplot
  rng = np.random.Generator(np.random.PCG64(seed))
  bank = [np.clip(kind(rng), 0, 1) for kind in _KINDS for _ in range(_PER_KIND)]
  for name in _SHIPPED_TEXTURES:
    img = np.asarray(matplotlib.image.imread(data / name), np.float64)[..., :3]
    bank.append(_shrink(img / 255 if img.max() > 1 else img))
  return [(img * 255).round().astype(np.uint8) for img in bank]


_TEXTURE_DIRS = []  # kept alive, so each is removed at exit


@functools.cache
def _texture_files(data: str) -> list[str]:
  """Writes the bank once per process as small PNGs: TinyRenderer loads textures from
  files, and loading the shipped ones at full size (up to 1461x853) cost more than the
  rest of a room."""
  import matplotlib.image
  _TEXTURE_DIRS.append(tempfile.TemporaryDirectory(prefix="zojax-rgbd-"))
  files = []
  for i, img in enumerate(texture_bank(pathlib.Path(data))):
    files.append(os.path.join(_TEXTURE_DIRS[-1].name, f"tex{i:03d}.png"))
    matplotlib.image.imsave(files[-1], img)
  return files


def _textures_of(kinds) -> list[int]:
  """Bank indices of the procedural textures of the given kind functions."""
  return [i * _PER_KIND + j for i, k in enumerate(_KINDS) if k in kinds for j in range(_PER_KIND)]


_FLOOR = _textures_of((_planks, _tiles, _fabric)) + [len(_KINDS) * _PER_KIND + i for i in (0, 6)]
_WALL = _textures_of((_plaster, _stripes, _bricks, _tiles))
_FURNITURE = _textures_of((_planks, _fabric, _plaster)) + [len(_KINDS) * _PER_KIND + 3]
_ANY = list(range(len(_KINDS) * _PER_KIND + len(_SHIPPED_TEXTURES)))


# ------------------------------------------------------------------------------------------
# Rooms

# (path in pybullet_data, global scaling range): everyday-sized props.
_PROPS = (("teddy_vhacd.urdf", (3.0, 6.0)), ("duck_vhacd.urdf", (2.0, 4.0)),
          ("objects/mug.urdf", (1.0, 2.0)), ("jenga/jenga.urdf", (1.0, 3.0)),
          ("lego/lego.urdf", (3.0, 8.0)), ("sphere2.urdf", (0.15, 0.45)),
          ("cube.urdf", (0.15, 0.5)), ("soccerball.urdf", (0.2, 0.35)),
          ("tray/traybox.urdf", (0.5, 0.9)))
_NUM_RANDOM_URDFS = 1000


class _Floorplan:
  """Axis-aligned footprints taken on the floor, to keep furniture from interpenetrating."""

  def __init__(self, half_x, half_y):
    self.half = np.array([half_x, half_y])
    self.taken: list[np.ndarray] = []  # [xmin, ymin, xmax, ymax]

  def fits(self, lo, hi) -> bool:
    if np.any(lo < -self.half) or np.any(hi > self.half):
      return False
    return all(np.any(hi <= t[:2]) or np.any(lo >= t[2:]) for t in self.taken)

  def take(self, lo, hi) -> None:
    self.taken.append(np.concatenate([lo, hi]))


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [int(seed), SPLITS[split], int(index)])))


def build_room(r: Renderer, rng: np.random.Generator):
  """Resets `r` and builds one random room; returns (eye, rotation, light) for `capture`."""
  r.reset()
  hx, hy = rng.uniform(1.5, 3.25), rng.uniform(1.5, 3.5)
  hz = rng.uniform(2.4, 3.2)
  floor_tex, wall_tex = rng.choice(_FLOOR), rng.choice(_WALL)
  tint = lambda lo=0.7: rng.uniform(lo, 1.0, 3)
  ex, ey, ez = np.eye(3)
  r.quad((0, 0, 0), ex, ey, (2 * hx, 2 * hy), rng.uniform(0.4, 1.5), floor_tex, tint())
  r.quad((0, 0, hz), ey, ex, (2 * hy, 2 * hx), 1.0, rng.choice(_textures_of((_plaster,))),
         tint(0.85))
  wall_rgb = tint()
  # Walls: (inward normal, along-wall axis, half length, distance from centre); the axis is
  # ez x normal, so (along, ez) spans the wall facing into the room.
  walls = [(n, np.cross(ez, n), half, dist)
           for n, half, dist in ((-ex, hy, hx), (ex, hy, hx), (-ey, hx, hy), (ey, hx, hy))]
  for normal, along, half, dist in walls:
    accent = rng.uniform() < 0.2
    r.quad(-normal * dist + ez * hz / 2, along, ez, (2 * half, hz), rng.uniform(0.5, 2.0),
           rng.choice(_WALL) if accent else wall_tex, tint() if accent else wall_rgb)

  # The camera stands near one wall and looks into the room.
  k = int(rng.integers(4))
  normal, along, half, dist = walls[k]
  back = rng.uniform(0.3, 1.2)
  eye = (-normal * dist + normal * back + along * rng.uniform(-0.7, 0.7) * half
         + ez * rng.uniform(1.0, 1.8))
  yaw = np.arctan2(normal[1], normal[0]) + rng.uniform(-0.6, 0.6)
  pitch = float(np.clip(rng.normal(-0.2, 0.15), -0.6, 0.15))
  rotation = camera_rotation(yaw, pitch, rng.normal(0, 0.03))

  plan = _Floorplan(hx, hy)
  plan.take(eye[:2] - 0.6, eye[:2] + 0.6)
  surfaces = []  # (lo_xy, hi_xy, z) where props may stand
  for normal, along, half, dist in walls:
    _decorate_wall(r, rng, normal, along, half, dist, hz)
    for _ in range(int(rng.integers(0, 4))):
      _against_wall(r, rng, plan, surfaces, normal, along, half, dist)
  for _ in range(int(rng.integers(0, 3))):
    _table_and_chairs(r, rng, plan, surfaces, hx, hy)
  surfaces.append((-np.array([hx, hy]) + 0.1, np.array([hx, hy]) - 0.1, 0.0))
  for _ in range(int(rng.integers(8, 24))):
    _prop(r, rng, plan, surfaces)

  light = Light(direction=(*rng.normal(0, 1, 2), rng.uniform(1.0, 3.0)),
                color=tuple(rng.uniform(0.9, 1.0, 3)), ambient=rng.uniform(0.45, 0.75),
                diffuse=rng.uniform(0.25, 0.55), specular=rng.uniform(0.0, 0.15))
  return eye, rotation, light


def _decorate_wall(r, rng, normal, along, half, dist, hz):
  """Doors, pictures and windows: thin boxes just off the wall."""
  for _ in range(int(rng.integers(0, 3))):
    kind = rng.choice(["door", "picture", "window"])
    if kind == "door":
      w, h, z = 0.9, 2.05, 1.025
    elif kind == "picture":
      w, h = rng.uniform(0.3, 1.2), rng.uniform(0.3, 0.9)
      z = rng.uniform(1.2, min(1.9, hz - h / 2 - 0.1))
    else:
      w, h = rng.uniform(0.8, 1.8), rng.uniform(0.8, 1.3)
      z = rng.uniform(0.9 + h / 2, hz - h / 2 - 0.15)
    if w > 2 * half - 0.4:
      continue
    pos = -normal * dist + along * rng.uniform(-half + w / 2 + 0.2, half - w / 2 - 0.2)
    depth = 0.04 if kind != "window" else 0.02
    center = pos + normal * depth / 2 + np.array([0, 0, z])
    hx, hy = np.abs(along[:2]) * w / 2 + np.abs(normal[:2]) * depth / 2
    rgb = (rng.uniform(0.85, 1.0, 3) if kind == "window" else rng.uniform(0.2, 0.9, 3))
    tex = rng.choice(_ANY) if kind == "picture" else (
        rng.choice(_textures_of((_planks,))) if kind == "door" and rng.uniform() < 0.5 else None)
    r.box(center, (hx, hy, h / 2), rgb, texture=tex)


def _against_wall(r, rng, plan, surfaces, normal, along, half, dist):
  """A cabinet, bed, sofa, shelf or desk with its back to the wall."""
  kind = rng.choice(["cabinet", "bed", "sofa", "shelf", "desk"], p=[0.35, 0.15, 0.2, 0.1, 0.2])
  size = {"cabinet": (rng.uniform(0.4, 1.4), rng.uniform(0.35, 0.6), rng.uniform(0.5, 2.1)),
          "bed": (rng.uniform(1.0, 1.9), rng.uniform(1.9, 2.1), rng.uniform(0.35, 0.6)),
          "sofa": (rng.uniform(1.4, 2.4), rng.uniform(0.8, 1.0), 0.85),
          "shelf": (0.9, 0.9, 2.3),
          "desk": (1.5, 1.0, 0.6)}[kind]
  scale = rng.uniform(0.7, 1.1) if kind in ("shelf", "desk") else 1.0
  w, d, h = (v * scale for v in size)  # along the wall, into the room, up
  if w > 2 * half - 0.1:
    return
  centre = (-normal * dist + normal * (d / 2 + 0.01)
            + along * rng.uniform(-half + w / 2 + 0.05, half - w / 2 - 0.05))
  ext = np.abs(along[:2]) * w / 2 + np.abs(normal[:2]) * d / 2
  lo, hi = centre[:2] - ext, centre[:2] + ext
  if not plan.fits(lo, hi):
    return
  plan.take(lo, hi)
  yaw = float(np.arctan2(normal[1], normal[0]))  # local +x points into the room
  half_ext = lambda a, b, c: (np.abs(along) * a + np.abs(normal) * b + np.array([0, 0, c]))
  tex = rng.choice(_FURNITURE) if rng.uniform() < 0.7 else None
  rgb = rng.uniform(0.3, 1.0, 3)
  if kind == "cabinet":
    r.box(centre + [0, 0, h / 2], half_ext(w / 2, d / 2, h / 2), rgb, texture=tex)
    surfaces.append((lo + 0.05, hi - 0.05, h))
  elif kind == "bed":
    r.box(centre + [0, 0, h / 4], half_ext(w / 2, d / 2, h / 4), rgb, texture=tex)
    r.box(centre + [0, 0, 3 * h / 4], half_ext(w / 2 - 0.03, d / 2 - 0.03, h / 4),
          rng.uniform(0.6, 1.0, 3), texture=rng.choice(_textures_of((_fabric, _stripes))))
    head = centre - normal * (d / 2 - 0.04)
    r.box(head + [0, 0, h / 2 + 0.25], half_ext(w / 2, 0.04, h / 2 + 0.25), rgb, texture=tex)
    surfaces.append((lo + 0.3, hi - 0.3, h))
  elif kind == "sofa":
    fabric = rng.choice(_textures_of((_fabric,)))
    r.box(centre + [0, 0, 0.22], half_ext(w / 2, d / 2, 0.22), rgb, texture=fabric)
    back = centre - normal * (d / 2 - 0.1)
    r.box(back + [0, 0, h / 2], half_ext(w / 2, 0.1, h / 2), rgb, texture=fabric)
    for side in (-1, 1):
      arm = centre + along * side * (w / 2 - 0.1)
      r.box(arm + [0, 0, 0.3], half_ext(0.1, d / 2, 0.3), rgb, texture=fabric)
    surfaces.append((lo + 0.25, hi - 0.25, 0.44))
  elif kind == "shelf":
    body = r.load("kiva_shelf/model.sdf", (0, 0, 0), yaw, scale)
    bl, bh = r.aabb(body)
    r.move(body, np.array([*centre[:2], 0.0]) - [*(bl[:2] + bh[:2]) / 2, bl[2]])
  else:
    # table.urdf's long side is its x axis: turned a quarter, it runs along the wall.
    body = r.load("table/table.urdf", (0, 0, 0), yaw + np.pi / 2, scale)
    r.move(body, np.array([*centre[:2], 0.0]))
    surfaces.append((lo + 0.1, hi - 0.1, r.aabb(body)[1][2]))


def _table_and_chairs(r, rng, plan, surfaces, hx, hy):
  square = rng.uniform() < 0.4
  scale = rng.uniform(0.9, 1.3) if square else rng.uniform(0.8, 1.15)
  w, d = (0.6 * scale, 0.6 * scale) if square else (1.5 * scale, 1.0 * scale)
  yaw = float(rng.choice([0.0, np.pi / 2]))
  if yaw:
    w, d = d, w
  centre = np.array([rng.uniform(-hx + w / 2 + 0.3, hx - w / 2 - 0.3),
                     rng.uniform(-hy + d / 2 + 0.3, hy - d / 2 - 0.3)])
  lo, hi = centre - [w / 2, d / 2], centre + [w / 2, d / 2]
  if not plan.fits(lo, hi):
    return
  plan.take(lo, hi)
  path = "table_square/table_square.urdf" if square else "table/table.urdf"
  body = r.load(path, (*centre, 0.0), yaw, scale)
  top = r.aabb(body)[1][2]
  surfaces.append((lo + 0.08, hi - 0.08, top))
  rgb, tex = rng.uniform(0.2, 0.9, 3), rng.choice(_FURNITURE)
  for side in range(4):
    if rng.uniform() < 0.5:
      continue
    out = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]][side], np.float64)
    seat = centre + out * (np.array([w, d]) / 2 + 0.15)
    c_lo, c_hi = seat - 0.23, seat + 0.23
    if not plan.fits(c_lo, c_hi):
      continue
    plan.take(c_lo, c_hi)
    seat_z = top * 0.65
    r.box((*seat, seat_z), (0.22, 0.22, 0.025), rgb, texture=tex)
    for dx in (-0.19, 0.19):
      for dy in (-0.19, 0.19):
        r.box((seat[0] + dx, seat[1] + dy, seat_z / 2), (0.02, 0.02, seat_z / 2), rgb * 0.6)
    back = seat + out * 0.2
    ext = np.abs(out[::-1]) * 0.22 + np.abs(out) * 0.02
    r.box((*back, seat_z + 0.25), (*ext, 0.25), rgb, texture=tex)


def _prop(r, rng, plan, surfaces):
  """A random object resting on a random surface (floor, table, cabinet, bed or sofa)."""
  lo, hi, z = surfaces[int(rng.integers(len(surfaces)))]
  if np.any(hi - lo < 0.1):
    return
  if rng.uniform() < 0.2:  # a box (carton, bin, stool), axis-aligned
    half = rng.uniform(0.08, 0.3, 3)
    xy = rng.uniform(lo, hi)
    if z == 0.0:
      if not plan.fits(xy - half[:2], xy + half[:2]):
        return
      plan.take(xy - half[:2], xy + half[:2])
    tex = rng.choice(_ANY) if rng.uniform() < 0.5 else None
    r.box((*xy, z + half[2]), half, rng.uniform(0.2, 1.0, 3), texture=tex)
    return
  if rng.uniform() < 0.75:
    i = int(rng.integers(_NUM_RANDOM_URDFS))
    path, scale = f"random_urdfs/{i:03d}/{i:03d}.urdf", rng.uniform(2.0, 6.0)
  else:
    path, (a, b) = _PROPS[int(rng.integers(len(_PROPS)))]
    scale = rng.uniform(a, b)
  xy = rng.uniform(lo, hi)
  body = r.load(path, (*xy, z + 1.0), rng.uniform(0, 2 * np.pi), scale)
  blo, bhi = r.aabb(body)
  shift = np.array([*(xy - (blo[:2] + bhi[:2]) / 2), z - blo[2]])
  new_lo, new_hi = blo[:2] + shift[:2], bhi[:2] + shift[:2]
  if z == 0.0:
    if not plan.fits(new_lo, new_hi):
      r.p.removeBody(body, physicsClientId=r.client)
      return
    plan.take(new_lo, new_hi)
  r.move(body, shift)


def render(split: str, indices, *, height: int = HEIGHT, width: int = WIDTH,
           seed: int = 0) -> dict[str, np.ndarray]:
  """Renders rooms `indices` of `split` (each a pure function of seed, split, index).

  Returns:
    ``image`` uint8 [N, height, width, 3] and ``depth`` float32 [N, height, width] metres,
    0 where invalid.
  """
  if split not in SPLITS:
    raise ValueError(f"rgbd: split {split!r} is not one of {tuple(SPLITS)}")
  indices = list(indices)
  image = np.zeros((len(indices), height, width, 3), np.uint8)
  depth = np.zeros((len(indices), height, width), np.float32)
  with Renderer(height, width) as r:
    for n, i in enumerate(indices):
      eye, rotation, light = build_room(r, _rng(seed, split, i))
      image[n], depth[n] = r.capture(eye, rotation, light)
  return {"image": image, "depth": depth}


# ------------------------------------------------------------------------------------------
# The cached dataset


def cache_dir(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> pathlib.Path:
  """Where the rendered chunks live; named by everything that changes their contents."""
  wheel = fetch.ASSETS["pybullet"].sha256[:12]
  return (fetch.data_dir() / "rgbd_rooms"
          / f"v{GENERATOR_VERSION}-{height}x{width}-seed{seed}-pybullet{wheel}")


def _chunks(count: int) -> list[tuple[int, int]]:
  return [(a, min(a + CHUNK, count)) for a in range(0, count, CHUNK)]


def _chunk_path(directory: pathlib.Path, split: str, start: int, stop: int) -> pathlib.Path:
  return directory / f"{split}-{start:06d}-{stop:06d}.npz"


def _sidecar(path: pathlib.Path) -> pathlib.Path:
  return path.with_suffix(".json")


def _read_chunk(path: pathlib.Path) -> tuple[dict[str, np.ndarray], float] | None:
  """The chunk's arrays and render seconds, or None if missing, incomplete or corrupt."""
  side = _sidecar(path)
  if not (path.exists() and side.exists()):
    return None
  try:
    meta = json.loads(side.read_text())
    if fetch.sha256_of(path) != meta["sha256"]:
      log.warning("rgbd: %s fails its checksum; rendering it again", path.name)
      return None
    with np.load(path) as z:
      return {"image": z["image"], "depth": z["depth"]}, float(meta["seconds"])
  except (OSError, ValueError, KeyError) as e:
    log.warning("rgbd: %s is unreadable (%s); rendering it again", path.name, e)
    return None


def _render_chunk(directory: pathlib.Path, split: str, start: int, stop: int, height: int, width: int,
                  seed: int) -> float:
  """Renders one chunk and writes it atomically (npz, then its sidecar); returns seconds."""
  t0 = time.perf_counter()
  data = render(split, range(start, stop), height=height, width=width, seed=seed)
  seconds = time.perf_counter() - t0
  path = _chunk_path(directory, split, start, stop)
  tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
  np.savez_compressed(tmp, **data)
  digest = fetch.sha256_of(tmp)
  tmp.replace(path)
  side = _sidecar(path)
  side_tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
  side_tmp.write_text(json.dumps({"sha256": digest, "seconds": seconds, "count": stop - start,
                                  "host": platform.node()}))
  side_tmp.replace(side)
  return seconds


def rooms(split: str, count: int, *, height: int = HEIGHT, width: int = WIDTH, seed: int = 0,
          deadline: float | None = None) -> dict:
  """The first `count` rooms of `split`, rendered into the cache on first use.

  Args:
    split: "train" or "test" (independent streams of `seed`).
    count: number of images; any count reuses the cached chunks of a larger one.
    height, width: image size.
    seed: the data seed.
    deadline: a `time.monotonic()` value after which no new chunk starts; the result is
      then None if chunks are still missing (for resumable command-line rendering).

  Returns:
    ``image`` uint8 [count, H, W, 3], ``depth`` float32 [count, H, W] (metres, 0 invalid),
    ``seconds`` (the render time of these chunks when they were rendered) and
    ``rendered`` (how many images this call rendered).
  """
  if split not in SPLITS:
    raise ValueError(f"rgbd: split {split!r} is not one of {tuple(SPLITS)}")
  directory = cache_dir(height, width, seed)
  directory.mkdir(parents=True, exist_ok=True)
  chunks = _chunks(count)
  loaded = {c: _read_chunk(_chunk_path(directory, split, *c)) for c in chunks}
  missing = [c for c, v in loaded.items() if v is None]
  rendered = 0
  if missing:
    log.info("rgbd: rendering %d %s images into %s", sum(b - a for a, b in missing), split,
             directory)
    # One process: on 2 shared cores, 2 processes rendered 200 rooms in 42 s and 37 s
    # against 29 s for one (the machine's load average was 7).
    for c in missing:
      if deadline is not None and time.monotonic() > deadline:
        break
      seconds = _render_chunk(directory, split, *c, height, width, seed)
      rendered += c[1] - c[0]
      log.info("rgbd: %s %d-%d rendered in %.1f s", split, *c, seconds)
    loaded = {c: _read_chunk(_chunk_path(directory, split, *c)) for c in chunks}
    if any(v is None for v in loaded.values()):
      if deadline is not None:
        return None
      raise RuntimeError(f"rgbd: chunks of {split} in {directory} failed to render")
  parts = [loaded[c][0] for c in chunks]
  return {"image": np.concatenate([p["image"] for p in parts]),
          "depth": np.concatenate([p["depth"] for p in parts]),
          "seconds": sum(loaded[c][1] for c in chunks), "rendered": rendered}


def task_config(**overrides):
  """The `rgbd_rooms` task's config (`zojax.data.tasks.build`), with `overrides` applied."""
  import ml_collections
  t = ml_collections.ConfigDict()
  t.name = "rgbd_rooms"
  t.image_height, t.image_width = HEIGHT, WIDTH   # multiples of 32
  t.num_train, t.num_test = 3000, 300
  t.data_seed = 0          # fixes the rooms; config.seed shuffles the batches
  t.update(overrides)
  return t


def as_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """uint8 images to float32 in [0, 1]; the rest unchanged."""
  return {**batch, "image": batch["image"].astype(np.float32) / 255.0}


def task_sets(cfg) -> tuple[dict, dict, dict]:
  """The `rgbd_rooms` task's data: (train, test, info), rendered on first use.

  train holds uint8 ``image`` [N, H, W, 3] (converted per batch by `as_float`, to keep
  3,000 images at 110 MB, not 440) and ``depth`` [N, H, W] metres, 0 invalid; test holds
  float32 ``image``, ``depth`` and ``eval_mask`` [N, H, W] (1 inside the Eigen crop).
  """
  check_size(cfg.image_height, cfg.image_width)
  for key in ("num_train", "num_test", "data_seed"):
    v = cfg[key]
    if not isinstance(v, (int, np.integer)) or v < (0 if key == "data_seed" else 1):
      raise ConfigError(f"config key 'task.{key}'={v!r} must be an integer >= "
                        f"{0 if key == 'data_seed' else 1}")
  h, w, seed = cfg.image_height, cfg.image_width, cfg.data_seed
  train = rooms("train", cfg.num_train, height=h, width=w, seed=seed)
  test = rooms("test", cfg.num_test, height=h, width=w, seed=seed)
  mask = np.broadcast_to(eigen_mask(h, w).astype(np.float32), test["depth"].shape)
  k = intrinsics(h, w)
  info = {"name": "rgbd_rooms", "image_size": [h, w], "data_seed": seed,
          "sizes": {"train": cfg.num_train, "test": cfg.num_test},
          "render_seconds": {"train": round(train["seconds"], 1),
                             "test": round(test["seconds"], 1)},
          "intrinsics": [k[0, 0], k[1, 1], k[0, 2], k[1, 2]],
          "depth_range": [MIN_DEPTH, MAX_DEPTH], "eigen_crop": list(eigen_crop(h, w)),
          "cache": str(cache_dir(h, w, seed))}
  return ({"image": train["image"], "depth": train["depth"]},
          as_float({"image": test["image"], "depth": test["depth"], "eval_mask": mask.copy()}),
          info)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description="Render the RGB-D rooms into the cache (resumable).")
  ap.add_argument("--train", type=int, default=3000)
  ap.add_argument("--test", type=int, default=300)
  ap.add_argument("--height", type=int, default=HEIGHT)
  ap.add_argument("--width", type=int, default=WIDTH)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--minutes", type=float, default=None,
                  help="start no new chunk after this; run again to resume")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
  summary = {"cache": str(cache_dir(args.height, args.width, args.seed))}
  t0 = time.perf_counter()
  for split in ("test", "train"):
    data = rooms(split, getattr(args, split), height=args.height, width=args.width,
                 seed=args.seed, deadline=deadline)
    if data is None:
      summary[split] = "incomplete: run again to resume"
      continue
    summary[split] = {"count": len(data["image"]), "render_seconds": round(data["seconds"], 1),
                      "rendered_now": data["rendered"],
                      "valid_fraction": round(float((data["depth"] > 0).mean()), 4)}
  summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
  print(json.dumps(summary))
  return 0 if all(isinstance(summary[s], dict) for s in ("train", "test")) else 3


if __name__ == "__main__":
  sys.exit(main())
