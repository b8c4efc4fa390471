"""`python -m mpq.data.install [--quiet]`: makes Fashion-MNIST available (run by `make setup`)."""

import sys

from mpq.data import fashion_mnist
from mpq.errors import DataError


def main(argv):
  if argv not in ([], ["--quiet"]):
    sys.exit("usage: python -m mpq.data.install [--quiet]")
  try:
    path = fashion_mnist.install(quiet=bool(argv))
  except DataError as e:
    sys.exit(f"error: {e}")
  if not argv:
    print(f"Fashion-MNIST ready in {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
