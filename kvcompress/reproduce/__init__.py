"""`make reproduce`: rerun the five seed reports' tables over seeds and write REPRODUCTION.md.

    python -m kvcompress.reproduce --scale mini                      # all five tables, 2 seeds, on a CPU
    python -m kvcompress.reproduce --scale mini --tables 003,004     # some tables
    python -m kvcompress.reproduce --scale paper --dry-run           # compose and list every run, train nothing

The protocols are `conf/reproduce/<scale>.yaml`: per table, its runs as `python -m kvcompress.train`
overrides. Each (table, run, seed) trains in its own folder `<out>/<table>/<run>/seed<k>`; stages go to one
shared `<out>/stages`, so a stopped reproduction resumes: finished runs are reused (their `metrics.json`),
finished stages are reused and a killed stage resumes from its last checkpoint. It ends by writing
`<out>/REPRODUCTION.md`: per table the seed report's numbers next to ours (mean ± std over seeds); each claim judged
on paired per-window losses with a 95% CI as reproduced / not reproduced / inconclusive (or not comparable when
its data were not recorded), next to the report's number, the threshold and its source; the table's deviations
from the report; and the plots (`kvcompress.report`).

The package, one idea a file: `protocol` (the protocols and the run plan), `runs` (training each run, reuse),
`claims` (the seed reports' tables and the rules that judge each claim), `writer` (REPRODUCTION.md), `cli`.
"""

from kvcompress.reproduce.claims import INCONCLUSIVE, NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, TABLES
from kvcompress.reproduce.cli import main
from kvcompress.reproduce.protocol import RunSpec, load_protocol, plan

__all__ = [
    "INCONCLUSIVE",
    "NOT_COMPARABLE",
    "NOT_REPRODUCED",
    "REPRODUCED",
    "TABLES",
    "RunSpec",
    "load_protocol",
    "main",
    "plan",
]
