"""`python -m llm_worker.cli`: the command line, as the `llm-worker` script runs it."""

import sys

from llm_worker.cli.main import main

sys.exit(main())
