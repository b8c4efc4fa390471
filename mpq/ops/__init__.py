"""Op kinds and integer IR ops, registered once each (see `mpq.ops.registry`).

Built in: `dense`, `conv`, `conv_bn` (linear.py), `add` (add.py), `max_pool`, `avg_pool` (pool.py),
`relu`, `relu6` (activation.py) and the boundary IR ops `quantize`, `requantize`, `dequantize`
(io.py). Importing this package registers them.
"""

from mpq.ops import activation, add, io, linear, pool  # noqa: F401  (registration)
from mpq.ops.registry import (IR_OPS, KINDS, Activation, IROp, OpKind, Transform,
                              UnknownOpError, activation as get_activation, ir_op, kind, register)

__all__ = ["IR_OPS", "KINDS", "Activation", "IROp", "OpKind", "Transform", "UnknownOpError",
           "get_activation", "ir_op", "kind", "register"]
