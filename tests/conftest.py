import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_cli(*args, env=None, timeout=300):
  """Runs `python <args>` in the repo root; returns CompletedProcess with text output."""
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                        timeout=timeout)


def snapshot(d):
  """Every file under `d` with its size, mtime and bytes (to show that a command wrote nothing)."""
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        out[p] = (st.st_size, st.st_mtime_ns, fh.read())
  return out


@pytest.fixture
def tiny_config():
  from configs import tiny
  return tiny.get_config()
