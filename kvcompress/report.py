"""`python -m kvcompress.report <run or multirun folders> [--out DIR] [--wandb]`: tables and plots over runs.
`python -m kvcompress.report compare <runs of A...> -- <runs of B...> [--metric M] [--json]`: PPL(B) / PPL(A) on
paired validation windows, with a confidence interval.

The work is in `kvcompress.evaluation.report` and `kvcompress.evaluation.compare`."""

from kvcompress.evaluation.report import main

if __name__ == "__main__":
    raise SystemExit(main())
