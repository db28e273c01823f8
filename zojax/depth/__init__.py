"""Monocular depth: SIlog loss and the evaluation metrics, align-corners resizing, plots.

The iDisc network itself is a model (`zojax.models.idisc`); this package holds what any
depth model needs around it.
"""

from zojax.depth.metrics import metric_sums, silog_loss, silog_loss_per_image
from zojax.depth.resize import resize_align_corners

__all__ = ["metric_sums", "resize_align_corners", "silog_loss", "silog_loss_per_image"]
