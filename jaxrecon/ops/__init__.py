"""Floor 1: differentiable sampling ops as pure functions over arrays (no Flax).

* `grid_sample`: bilinear sampling equal to ``torch.nn.functional.grid_sample`` (Eq. 7-8, 18),
  channels last, custom VJP; `grid_sample_reference` is its plain-autodiff oracle.
* `variance_grid_sample`: the paper's variance branch (Eq. 11, 16-17, 27-30), modes 'adaptive',
  'paper', 'none'; `variance_grid_sample_reference` is its stop-gradient oracle.
* `lookahead_loss`: the one-step lookahead of Eq. 31-32 that trains the variance.
* `collectives`: cross-device sums in device order (for `config.reduction='ordered'`), whose
  results do not depend on how the devices are split over processes.

See docs/ops.md.
"""

from jaxrecon.ops.bilinear import grid_sample
from jaxrecon.ops.bilinear import grid_sample_reference
from jaxrecon.ops.variance import lookahead_loss
from jaxrecon.ops.variance import variance_grid_sample
from jaxrecon.ops.variance import variance_grid_sample_reference

__all__ = [
    "grid_sample",
    "grid_sample_reference",
    "lookahead_loss",
    "variance_grid_sample",
    "variance_grid_sample_reference",
]
