"""The variable types of quantizers (so optimizers, checkpoints and the exporter can select them).

  `QParam(nnx.Param)`     a learned quantizer parameter (step size, log2 threshold, offset, amax,
                          gradient scale, continuous bits): trained, never weight-decayed; its
                          `opt_group` metadata names the optimizer group its estimator declares
  `QState(nnx.Variable)`  quantizer state that is not trained: bits, EMA ranges, counters
"""

from flax import nnx


class QParam(nnx.Param):
  """A learned quantizer parameter; `opt_group` (metadata) names its optimizer (`ParamGroup`)."""


class QState(nnx.Variable):
  """Quantizer state that is not trained (bits, EMA ranges, counters)."""
