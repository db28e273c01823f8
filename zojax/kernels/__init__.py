"""Pallas kernels for the hot paths, each beside its plain-jnp `*_reference`.

  attention:  flash attention forward + backward ("pallas"), an O(N)-memory scan
              ("blockwise"), the naive reference ("xla"); `attention.attention` dispatches.
  projection: GaLore's fused low-rank projections, `projection.project` and
              `projection.project_back`.
"""

from zojax.kernels import attention
from zojax.kernels import projection

__all__ = ["attention", "projection"]
