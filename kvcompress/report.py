"""`python -m kvcompress.report <run or multirun folders> [--out DIR] [--wandb]`: tables and plots over runs.

The work is in `kvcompress.evaluation.report`."""

from kvcompress.evaluation.report import main

if __name__ == "__main__":
    raise SystemExit(main())
