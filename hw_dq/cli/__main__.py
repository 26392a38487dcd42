"""python -m hw_dq.cli: the same as the hw-dq command."""

import sys

from hw_dq.cli.main import main

sys.exit(main())
