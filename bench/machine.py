"""What every benchmark prints first: the machine's load, and a loud refusal to time a busy CPU.

A busy CPU compresses every popup/dense ratio toward 1 (0.93x measured busy where the idle ratio was 1.8x), so a
benchmark run while tests, sweeps or other jobs share the cores is worthless. ``check_idle`` prints the 1-minute
load average and the core count, and exits unless the load is well below one busy core (``--allow-busy`` runs
anyway, with the warning in the output next to the figures).
"""

from __future__ import annotations

import os
import sys

#: 1-minute load average above which the machine counts as busy
BUSY_LOAD = 0.5


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def check_idle(allow_busy: bool = False) -> None:
    """Print the load; refuse (exit 3) when the CPU is busy unless ``allow_busy``, then warn loudly."""
    line = load_line()
    if os.getloadavg()[0] <= BUSY_LOAD:
        print(f"machine: {line}: idle", flush=True)
        return
    warning = (f"machine: {line}: BUSY (> {BUSY_LOAD}); timings taken now understate popup/dense ratios and are "
               "not to be quoted")
    if not allow_busy:
        print(f"{warning}. Stop the other work and run again, or pass --allow-busy.", file=sys.stderr)
        raise SystemExit(3)
    print(f"WARNING {warning}", flush=True)
