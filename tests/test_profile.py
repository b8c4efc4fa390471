"""benchmarks/profile.py: the per-fusion profile that benchmarks/README.md's findings come from."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profile


def test_profile_attributes_time_to_the_fusions_of_the_compiled_module(tmp_path):
  @jax.jit
  def f(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y * 3.0 + 1.0).sum(axis=(1, 2))

  x = jnp.asarray(np.random.RandomState(0).randn(32, 32, 32, 8), jnp.float32)
  w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 8, 16), jnp.float32)
  hlo = f.lower(x, w).compile().as_text()
  what = profile._fusion_summaries(hlo)  # pylint: disable=protected-access
  assert what and any("tanh" in v for v in what.values()), what
  jax.block_until_ready(f(x, w))
  ms, walls = profile._trace(lambda: jax.block_until_ready(f(x, w)), str(tmp_path), 3)  # pylint: disable=protected-access
  assert len(walls) == 3 and sum(ms.values()) > 0
  traced = [n for n in ms if n in what]
  assert traced, (sorted(ms), sorted(what))  # trace events carry the HLO instruction names
  text = profile.report(ms, walls, hlo, top=5)
  assert "median wall time" in text and "by kind:" in text and "convolutions/dots" in text
