"""One kubetrain trainer run for the throughput benchmark, optionally with a lever off.

Run as: python kubetrain_child.py CONFIG_YAML [no-labelled-head]

The trainer exactly as a pod runs it (`python -m kubetrain_trainer --config ...`); with
`no-labelled-head` the LM head stays TRL's (every position scored), to measure that lever
alone. Length grouping is switched off in the config instead (data.groupByLength).
"""

import sys

import kubetrain_trainer.throughput
from kubetrain_trainer.__main__ import main

if "no-labelled-head" in sys.argv[2:]:
    kubetrain_trainer.throughput.labelled_positions_head = lambda model: None
sys.exit(main(["--config", sys.argv[1]]))
