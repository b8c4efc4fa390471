"""Integer-only reference execution (pure jax.numpy / lax, int32 arithmetic)."""

from mpq.fixedpoint import (multiply_by_quantized_multiplier, quantize_multiplier,
                          quantize_multipliers, requant_multiplier,
                          rounding_divide_by_pot,
                          saturating_rounding_doubling_high_mul, srdhm_nonneg)

__all__ = ["multiply_by_quantized_multiplier", "quantize_multiplier", "quantize_multipliers",
           "requant_multiplier", "rounding_divide_by_pot", "saturating_rounding_doubling_high_mul",
           "srdhm_nonneg"]
from mpq.intexec.executor import build, intermediates  # noqa: E402
