"""`python -m anomaly_agent_cli`: the same as the `anomaly-agent` console script."""

import sys

from anomaly_agent_cli import main

sys.exit(main())
