"""Training entry point: `python -m kvcompress.train [group=option ...] [-m]` (`--help` lists the groups).

Checks the data and the model first (bad input fails in seconds, with one line), then runs every stage,
evaluates the result (val PPL, position-wise PPL, cache bytes per token, decode TTFT / TPOT) and writes
`metrics.json` with the run record in the run folder. The work is done by the run harness, `kvcompress.run`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kvcompress.run import CONF_DIR, refuse_ignored_overrides, run_guarded, train_stages


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_guarded(cfg, train_stages)


if __name__ == "__main__":
    refuse_ignored_overrides(sys.argv[1:])
    main()
