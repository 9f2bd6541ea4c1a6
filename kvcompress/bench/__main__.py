"""`python -m kvcompress.bench` (see the package docstring)."""

import sys

from kvcompress.bench.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
