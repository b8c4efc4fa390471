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


@pytest.fixture
def tiny_config():
  from configs import tiny
  return tiny.get_config()
