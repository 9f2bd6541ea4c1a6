"""`python -m kvcompress.reproduce` (see the package docstring)."""

from kvcompress.reproduce.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
