"""iDisc (Piccinelli et al., CVPR 2023) as a Flax NNX model: depth from internal discretization.

  image [B, H, W, 3] -> residual CNN encoder (strides 4, 8, 16, 32)
    -> FPN pixel decoder; keep 1/16, 1/8, 1/4 (C = pixel_dim channels each)
    -> per resolution r:
         AFP: N learnable IDR priors [N, D] ~ N(0, 1), refined by `afp_iters` iterations
              of one shared cross-attention layer (idr += attn(idr, pixels); idr += mlp)
              with TRANSPOSED attention: softmax over the IDR axis for each pixel, +1e-6,
              then renormalised over the pixels of each IDR (`afp_weights`);
         ISD: `isd_layers` layers of pixels (queries) attending the N IDRs (keys, values)
              with an ordinary softmax over the IDRs (`isd_attention`, via
              `zojax.kernels.attention`), then an MLP; head LN -> Linear -> LN -> Linear(1)
              gives log-depth [B, h_r, w_r];
    -> exp per resolution, bilinear (align_corners=True) to the 1/4 map, mean IN DEPTH
       SPACE over the 3 resolutions, bilinear to [B, H, W] (`fuse_depths`).

Pixels carry a DETR sine position embedding in both AFP and ISD; attention has one head and
pre-norm LayerNorms on both sides, as in the official code (SysCV/idisc, NYU config). The
encoder is trained from scratch (no pretrained backbone offline), so it uses GroupNorm rather
than BatchNorm: small CPU batches, short runs, no train/eval statistics gap.

Variants (`model.variant`), the ablation switches:
  * "idisc": the above.
  * "no_afp": ISD attends to the static (learned, input-independent) priors; no AFP layers.
  * "baseline": the same encoder and FPN with a per-resolution head (`isd_layers` residual
    MLP blocks, then the same output head) and no IDRs at all; its MLP width is chosen so
    the parameter count is within a few percent of iDisc's (`baseline_hidden`).

Registered as ``idisc``; trains on batches {"image", "depth"} (plus "weight", "eval_mask"
in eval) with the SIlog loss (`zojax.depth.metrics`); see `depth_loss`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zojax.depth import metrics as depth_metrics
from zojax.depth.resize import resize_align_corners
from zojax.errors import ConfigError
from zojax.kernels import attention as attention_kernels
from zojax.models import flax_adapter, interface, registry

log = logging.getLogger(__name__)

VARIANTS = ("idisc", "no_afp", "baseline")
STRIDE = 32           # the encoder's coarsest stride: image sides must be multiples of it
NUM_RESOLUTIONS = 3   # 1/16, 1/8, 1/4
AFP_EPS = 1e-6
# ImageNet statistics: inputs arrive in [0, 1].
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
_he = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class IDiscSettings:
  """Sizes and switches of the network (see the module docstring).

  Attributes:
    widths: encoder channels at strides 4, 8, 16, 32.
    blocks: residual blocks per encoder stage.
    pixel_dim: FPN channels C (also ISD's attention width; 1 head).
    idr_dim: IDR dimension D (also AFP's attention width).
    num_idrs: IDRs N per resolution.
    afp_iters: AFP iterations (sharing one attention layer and one MLP).
    isd_layers: ISD layers per resolution (each its own attention and MLP).
    expansion: MLP hidden width = expansion * input width.
    variant: one of `VARIANTS`.
    baseline_hidden: the baseline head's MLP width (0: expansion * pixel_dim).
    groups: GroupNorm groups in the encoder and FPN.
    attention: `zojax.kernels.attention` implementation for ISD.
  """

  widths: tuple[int, ...] = (16, 32, 64, 128)
  blocks: tuple[int, ...] = (1, 1, 1, 1)
  pixel_dim: int = 32
  idr_dim: int = 32
  num_idrs: int = 32
  afp_iters: int = 2
  isd_layers: int = 2
  expansion: int = 2
  variant: str = "idisc"
  baseline_hidden: int = 0
  groups: int = 8
  attention: str = "auto"


# ---------------------------------------------------------------------------------------
# The two attentions: AFP's transposed one (einsum) and ISD's ordinary one (kernels)


def afp_weights(q_BxNxD, k_BxPxD, eps: float = AFP_EPS):
  """[B, N, P] transposed attention weights of N IDRs over P pixels (the AFP of the paper).

  softmax over the IDR axis for each pixel (IDRs compete for pixels), + eps, then each IDR's
  row renormalised over pixels, so an IDR is a weighted mean of the pixels it won.
  """
  scores = jnp.einsum("bnd,bpd->bnp", q_BxNxD, k_BxPxD,
                      preferred_element_type=jnp.float32) / math.sqrt(q_BxNxD.shape[-1])
  a_BxNxP = jax.nn.softmax(scores, axis=1) + eps
  return a_BxNxP / jnp.sum(a_BxNxP, axis=2, keepdims=True)


def afp_attention(q_BxNxD, k_BxPxD, v_BxPxD, eps: float = AFP_EPS):
  """[B, N, D]: each IDR's `afp_weights`-weighted mean of the pixel values."""
  w_BxNxP = afp_weights(q_BxNxD, k_BxPxD, eps).astype(v_BxPxD.dtype)
  return jnp.einsum("bnp,bpd->bnd", w_BxNxP, v_BxPxD)


def isd_weights(q_BxPxD, k_BxNxD):
  """[B, P, N] ordinary attention weights: each pixel's softmax over the N IDRs."""
  scores = jnp.einsum("bpd,bnd->bpn", q_BxPxD, k_BxNxD,
                      preferred_element_type=jnp.float32) / math.sqrt(q_BxPxD.shape[-1])
  return jax.nn.softmax(scores, axis=-1)


def isd_attention(q_BxPxD, k_BxNxD, v_BxNxD, implementation: str = "auto"):
  """[B, P, D]: pixels attending IDRs through `zojax.kernels.attention` (1 head, P >> N)."""
  out = attention_kernels.attention(q_BxPxD[:, :, None], k_BxNxD[:, :, None],
                                    v_BxNxD[:, :, None], implementation=implementation)
  return out[:, :, 0]


# ---------------------------------------------------------------------------------------
# Output: fusion in depth space, and the position embedding


def fuse_depths(log_depths, height: int, width: int):
  """[B, height, width] depth: exp of each [B, h_r, w_r] log-depth, resized (aligned corners)
  to the finest map, averaged in depth space, resized to the output size."""
  h, w = log_depths[-1].shape[1:3]
  up = [resize_align_corners(jnp.exp(x)[..., None], h, w) for x in log_depths]
  mean_BxHxWx1 = sum(up) / len(up)
  return resize_align_corners(mean_BxHxWx1, height, width)[..., 0]


def sine_position_embedding(height: int, width: int, dim: int) -> np.ndarray:
  """[height, width, dim] DETR sine embedding, positions normalised to (0, 2π].

  The first dim/2 channels encode the row, the rest the column; each half interleaves
  sin and cos at frequencies 10000^(-2k/(dim/2)).
  """
  feats = dim // 2
  freqs = 10000.0 ** (-2.0 * np.arange(feats // 2) / feats)

  def encode(n):
    pos = np.arange(1, n + 1) / (n + 1e-6) * 2 * np.pi
    angles = pos[:, None] * freqs[None, :]
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(n, feats)

  rows = np.broadcast_to(encode(height)[:, None, :], (height, width, feats))
  cols = np.broadcast_to(encode(width)[None, :, :], (height, width, feats))
  return np.concatenate([rows, cols], axis=-1).astype(np.float32)


def _with_position(x_BxHxWxC):
  """x + its sine position embedding, flattened to [B, H·W, C]."""
  B, H, W, C = x_BxHxWxC.shape
  x = x_BxHxWxC + jnp.asarray(sine_position_embedding(H, W, C), x_BxHxWxC.dtype)
  return x.reshape(B, H * W, C)


# ---------------------------------------------------------------------------------------
# Layers


class ConvNorm(nnx.Module):
  """Conv (no bias) -> GroupNorm -> optional relu."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, *,
               relu: bool = True, rngs: nnx.Rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, use_bias=False,
                         kernel_init=_he, rngs=rngs)
    self.norm = nnx.GroupNorm(cout, num_groups=min(groups, cout), rngs=rngs)
    self.relu = relu

  def __call__(self, x):
    x = self.norm(self.conv(x))
    return jax.nn.relu(x) if self.relu else x


class ResBlock(nnx.Module):
  """Basic residual block (two 3x3 convs); a 1x1 projection when the shape changes."""

  def __init__(self, cin: int, cout: int, stride: int, groups: int, *, rngs: nnx.Rngs):
    self.conv1 = ConvNorm(cin, cout, 3, stride, groups, rngs=rngs)
    self.conv2 = ConvNorm(cout, cout, 3, 1, groups, relu=False, rngs=rngs)
    self.skip = (ConvNorm(cin, cout, 1, stride, groups, relu=False, rngs=rngs)
                 if stride != 1 or cin != cout else None)

  def __call__(self, x):
    shortcut = x if self.skip is None else self.skip(x)
    return jax.nn.relu(shortcut + self.conv2(self.conv1(x)))


class Encoder(nnx.Module):
  """Residual CNN from scratch: features at strides 4, 8, 16, 32 (`widths` channels)."""

  def __init__(self, widths, blocks, groups: int, *, rngs: nnx.Rngs):
    w0 = widths[0]
    self.stem = nnx.List([ConvNorm(3, max(w0 // 2, 1), 3, 2, groups, rngs=rngs),
                          ConvNorm(max(w0 // 2, 1), w0, 3, 2, groups, rngs=rngs)])
    stages, cin = [], w0
    for i, (width, depth) in enumerate(zip(widths, blocks)):
      stage = []
      for j in range(depth):
        stride = 2 if (i > 0 and j == 0) else 1
        stage.append(ResBlock(cin, width, stride, groups, rngs=rngs))
        cin = width
      stages.append(nnx.List(stage))
    self.stages = nnx.List(stages)

  def __call__(self, image_BxHxWx3):
    x = image_BxHxWx3
    for layer in self.stem:
      x = layer(x)
    features = []
    for stage in self.stages:
      for block in stage:
        x = block(x)
      features.append(x)
    return features


def _upsample2_nearest(x_BxHxWxC):
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


class FPN(nnx.Module):
  """Top-down pixel decoder (the official BasePixelDecoder's shape): coarsest map through a
  3x3 conv; each finer one adds a 1x1 lateral to the nearest-upsampled coarser output, then
  a 3x3 conv. Returns C-channel maps at strides 32, 16, 8, 4."""

  def __init__(self, widths, dim: int, groups: int, *, rngs: nnx.Rngs):
    coarse_first = list(widths)[::-1]
    self.top = ConvNorm(coarse_first[0], dim, 3, 1, groups, rngs=rngs)
    self.laterals = nnx.List([ConvNorm(c, dim, 1, 1, groups, relu=False, rngs=rngs)
                              for c in coarse_first[1:]])
    self.outputs = nnx.List([ConvNorm(dim, dim, 3, 1, groups, rngs=rngs)
                             for _ in coarse_first[1:]])

  def __call__(self, features):
    coarse_first = features[::-1]
    y = self.top(coarse_first[0])
    outs = [y]
    for x, lateral, output in zip(coarse_first[1:], self.laterals, self.outputs):
      y = output(lateral(x) + _upsample2_nearest(y))
      outs.append(y)
    return outs


class Mlp(nnx.Module):
  """LayerNorm -> Linear(dim, hidden) -> GELU -> Linear(hidden, dim) (a residual branch)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(self.norm(x))))


class CrossAttention(nnx.Module):
  """Pre-norm single-head cross-attention: sink tokens read source tokens.

  ``transposed=True`` is AFP's attention (`afp_attention`: sinks = IDRs compete for source
  pixels); otherwise the ordinary softmax over sources through the kernels (`isd_attention`).
  """

  def __init__(self, sink_dim: int, source_dim: int, *, transposed: bool,
               implementation: str = "auto", rngs: nnx.Rngs):
    self.sink_norm = nnx.LayerNorm(sink_dim, epsilon=1e-6, rngs=rngs)
    self.source_norm = nnx.LayerNorm(source_dim, epsilon=1e-6, rngs=rngs)
    self.query = nnx.Linear(sink_dim, sink_dim, rngs=rngs)
    self.key = nnx.Linear(source_dim, sink_dim, rngs=rngs)
    self.value = nnx.Linear(source_dim, sink_dim, rngs=rngs)
    self.out = nnx.Linear(sink_dim, sink_dim, rngs=rngs)
    self.transposed = transposed
    self.implementation = implementation

  def __call__(self, sink_BxTxD, source_BxSxE):
    sink, source = self.sink_norm(sink_BxTxD), self.source_norm(source_BxSxE)
    q, k, v = self.query(sink), self.key(source), self.value(source)
    if self.transposed:
      out = afp_attention(q, k, v)
    else:
      out = isd_attention(q, k, v, self.implementation)
    return self.out(out)


class OutputHead(nnx.Module):
  """LN -> Linear -> LN -> Linear(1): per-pixel log-depth."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
    self.out = nnx.Linear(dim, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm2(self.proj(self.norm1(x))))[..., 0]


class IDRs(nnx.Module):
  """One resolution's IDRs: learnable priors, refined by AFP unless ``afp=False``."""

  def __init__(self, s: IDiscSettings, *, afp: bool, rngs: nnx.Rngs):
    self.priors = nnx.Param(jax.random.normal(rngs.params(), (s.num_idrs, s.idr_dim)))
    self.iters = s.afp_iters
    if afp:
      self.attention = CrossAttention(s.idr_dim, s.pixel_dim, transposed=True, rngs=rngs)
      self.mlp = Mlp(s.idr_dim, s.expansion * s.idr_dim, rngs=rngs)
    else:
      self.attention = self.mlp = None

  def __call__(self, pixels_BxPxC):
    B = pixels_BxPxC.shape[0]
    idr_BxNxD = jnp.broadcast_to(self.priors[...], (B, *self.priors.shape))
    if self.attention is None:
      return idr_BxNxD
    for _ in range(self.iters):  # one shared layer, applied afp_iters times
      idr_BxNxD = idr_BxNxD + self.attention(idr_BxNxD, pixels_BxPxC)
      idr_BxNxD = idr_BxNxD + self.mlp(idr_BxNxD)
    return idr_BxNxD


class ISDHead(nnx.Module):
  """One resolution's ISD: `isd_layers` x (pixels attend IDRs; MLP), then `OutputHead`."""

  def __init__(self, s: IDiscSettings, *, rngs: nnx.Rngs):
    # Named attention/mlp (lists of layers) so GaLore's default path pattern projects them.
    self.attention = nnx.List([
        CrossAttention(s.pixel_dim, s.idr_dim, transposed=False, implementation=s.attention,
                       rngs=rngs) for _ in range(s.isd_layers)])
    self.mlp = nnx.List([Mlp(s.pixel_dim, s.expansion * s.pixel_dim, rngs=rngs)
                         for _ in range(s.isd_layers)])
    self.head = OutputHead(s.pixel_dim, rngs=rngs)

  def __call__(self, pixels_BxPxC, idr_BxNxD):
    x = pixels_BxPxC
    for attention, mlp in zip(self.attention, self.mlp):
      x = x + attention(x, idr_BxNxD)
      x = x + mlp(x)
    return self.head(x)


class BaselineHead(nnx.Module):
  """The ablation's head: `isd_layers` residual MLPs (no attention), then `OutputHead`."""

  def __init__(self, s: IDiscSettings, *, rngs: nnx.Rngs):
    hidden = s.baseline_hidden or s.expansion * s.pixel_dim
    self.mlp = nnx.List([Mlp(s.pixel_dim, hidden, rngs=rngs) for _ in range(s.isd_layers)])
    self.head = OutputHead(s.pixel_dim, rngs=rngs)

  def __call__(self, pixels_BxPxC):
    x = pixels_BxPxC
    for mlp in self.mlp:
      x = x + mlp(x)
    return self.head(x)


class IDisc(nnx.Module):
  """The network (see the module docstring): image [B, H, W, 3] in [0, 1] -> depth [B, H, W]."""

  def __init__(self, s: IDiscSettings, *, rngs: nnx.Rngs):
    check_settings(s)
    self.encoder = Encoder(s.widths, s.blocks, s.groups, rngs=rngs)
    self.decoder = FPN(s.widths, s.pixel_dim, s.groups, rngs=rngs)
    if s.variant == "baseline":
      self.heads = nnx.List([BaselineHead(s, rngs=rngs) for _ in range(NUM_RESOLUTIONS)])
      self.idrs = self.isd = None
    else:
      self.heads = None
      self.idrs = nnx.List([IDRs(s, afp=s.variant == "idisc", rngs=rngs)
                            for _ in range(NUM_RESOLUTIONS)])
      self.isd = nnx.List([ISDHead(s, rngs=rngs) for _ in range(NUM_RESOLUTIONS)])

  def log_depths(self, image_BxHxWx3):
    """Per-resolution log-depth maps [B, h, w] at strides 16, 8, 4 (coarse to fine)."""
    check_image_shape(image_BxHxWx3.shape)
    x = (image_BxHxWx3.astype(jnp.float32) - _MEAN) / _STD
    maps = self.decoder(self.encoder(x))[-NUM_RESOLUTIONS:]
    outs = []
    for r, m in enumerate(maps):
      B, h, w, _ = m.shape
      pixels_BxPxC = _with_position(m)
      if self.heads is not None:
        out = self.heads[r](pixels_BxPxC)
      else:
        out = self.isd[r](pixels_BxPxC, self.idrs[r](pixels_BxPxC))
      outs.append(out.reshape(B, h, w))
    return outs

  def __call__(self, image_BxHxWx3):
    H, W = image_BxHxWx3.shape[1:3]
    return fuse_depths(self.log_depths(image_BxHxWx3), H, W)


# ---------------------------------------------------------------------------------------
# Checks, loss, registration


def check_settings(s: IDiscSettings) -> None:
  """One-line ConfigErrors naming the `model.*` key."""
  if s.variant not in VARIANTS:
    raise ConfigError(f"config key 'model.variant'={s.variant!r} is not one of {VARIANTS}")
  for key in ("num_idrs", "idr_dim", "pixel_dim", "afp_iters", "isd_layers", "expansion",
              "groups"):
    value = getattr(s, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"config key 'model.{key}'={value!r} must be a positive int")
  if s.baseline_hidden < 0:
    raise ConfigError(f"config key 'model.baseline_hidden'={s.baseline_hidden!r} must be >= 0")
  if s.pixel_dim % 4:
    raise ConfigError(f"config key 'model.pixel_dim'={s.pixel_dim} must be a multiple of 4 "
                      "(sine position embedding: sin/cos pairs for rows and columns)")
  if len(s.widths) != 4 or len(s.blocks) != 4 or min(s.widths) < 1 or min(s.blocks) < 1:
    raise ConfigError(f"config keys 'model.widths'={s.widths} and 'model.blocks'={s.blocks} "
                      "need 4 positive entries each (strides 4, 8, 16, 32)")
  if s.attention not in attention_kernels.IMPLEMENTATIONS:
    raise ConfigError(f"config key 'model.attention'={s.attention!r} is not one of "
                      f"{attention_kernels.IMPLEMENTATIONS}")


def check_image_shape(shape, field: str = "batch 'image'") -> None:
  """Image height and width must be multiples of the encoder's stride 32."""
  if len(shape) != 4 or shape[-1] != 3:
    raise ConfigError(f"{field} has shape {tuple(shape)}; expected [B, H, W, 3]")
  H, W = shape[1:3]
  if H % STRIDE or W % STRIDE:
    raise ConfigError(f"{field} is {H}x{W}: height and width must be multiples of {STRIDE} "
                      "(the encoder's stride)")


def _warn_no_valid_pixel(n_valid) -> None:
  if float(n_valid) == 0:
    log.warning("batch 'depth' has no valid pixel (gt > %g): its loss is NaN, so the step "
                "is skipped and counted by skip_nonfinite", depth_metrics.MIN_DEPTH)


def depth_loss(module: nnx.Module, batch):
  """SIlog of ``module(batch["image"])`` against ``batch["depth"]``, and the metric sums.

  Valid pixels: depth > `MIN_DEPTH`, inside ``eval_mask`` and in rows of nonzero ``weight``
  when the batch has them (eval batches). The returned loss pools the batch's valid pixels
  (training); a batch without any valid pixel returns NaN with NaN gradients, so the
  optimizer's `skip_nonfinite` skips the step (params and optimizer state untouched, the
  skip counted), the loop logs it, and a warning names the field. Metric sums (`zojax.depth.metrics.metric_sums`) come with ``loss_sum`` (the
  per-image SIlog loss summed over images with a valid pixel) and ``count`` (those images).
  """
  pred_BxHxW = module(batch["image"])
  gt_BxHxW = batch["depth"].astype(jnp.float32)
  masks = [batch["eval_mask"]] if "eval_mask" in batch else []
  if "weight" in batch:
    masks.append(jnp.broadcast_to(batch["weight"][:, None, None], gt_BxHxW.shape))
  valid = depth_metrics.valid_mask(gt_BxHxW, *masks)
  loss, n_valid = depth_metrics.silog_loss(pred_BxHxW, gt_BxHxW, valid)
  if flax_adapter.is_training_batch(batch):
    jax.debug.callback(_warn_no_valid_pixel, n_valid)
  # skip_nonfinite judges the gradients, and a masked-out loss has zero ones: add NaN·sum(p),
  # whose gradient is NaN everywhere for an empty batch and exactly 0 otherwise.
  loss = loss + jnp.where(n_valid > 0, 0.0, jnp.nan) * jnp.sum(pred_BxHxW)
  per_image_B, n_B = depth_metrics.silog_loss_per_image(pred_BxHxW, gt_BxHxW, valid)
  has_B = (n_B > 0).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(has_B * per_image_B), "count": jnp.sum(has_B),
          **depth_metrics.metric_sums(pred_BxHxW, gt_BxHxW, valid)}
  return loss, sums


@functools.lru_cache(maxsize=64)
def num_params(s: IDiscSettings) -> int:
  """Parameter count of `IDisc(s)`, from shapes only."""
  module = nnx.eval_shape(lambda: IDisc(s, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def baseline_hidden(s: IDiscSettings) -> int:
  """The baseline MLP width whose parameter count is closest to iDisc's with settings `s`."""
  target = num_params(dataclasses.replace(s, variant="idisc"))
  at_one = num_params(dataclasses.replace(s, variant="baseline", baseline_hidden=1))
  # Each unit of MLP width adds a kernel column, a bias and a kernel row (2C + 1) per MLP.
  slope = NUM_RESOLUTIONS * s.isd_layers * (2 * s.pixel_dim + 1)
  return max(1, round(1 + (target - at_one) / slope))


def settings_from(cfg) -> IDiscSettings:
  """`IDiscSettings` from a config's model block (missing keys keep their defaults)."""
  fields = {f.name for f in dataclasses.fields(IDiscSettings)}
  kwargs = {k: cfg[k] for k in fields if k in cfg}
  for k in ("widths", "blocks"):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  s = IDiscSettings(**kwargs)
  check_settings(s)
  if s.variant == "baseline" and not s.baseline_hidden:
    s = dataclasses.replace(s, baseline_hidden=baseline_hidden(s))
  return s


def predictor(s: IDiscSettings):
  """``(params, image [B, H, W, 3]) -> depth [B, H, W]`` for the registered model's params
  (the adapter's plain dicts): for plots and zero-shot evaluation outside the loss."""
  abstract = nnx.eval_shape(lambda: IDisc(s, rngs=nnx.Rngs(0)))
  graphdef, params_t, rest = nnx.split(abstract, nnx.Param, ...)

  def predict(params, image_BxHxWx3):
    return nnx.merge(graphdef, flax_adapter._fill(params_t, params, "params"),
                     rest)(image_BxHxWx3)

  return predict


@registry.register("idisc")
def _idisc(cfg, task=None) -> interface.Model:
  # model.init='pretrained' is refused by the engine (no `pretrained` loader here).
  s = settings_from(cfg)
  size = (task.info if task is not None else {}).get("image_size")
  if size is not None:
    check_image_shape((1, *size, 3), field="task image size (task.image_height/image_width)")
  make = lambda rngs: IDisc(s, rngs=rngs)
  model = flax_adapter.from_flax(make, depth_loss, name=cfg.name,
                                 info={"settings": dataclasses.asdict(s)})
  # Eval results: each metric's sum over its count (pixels or images), see depth.metrics.
  return dataclasses.replace(model, eval_metrics=depth_metrics.finish)
