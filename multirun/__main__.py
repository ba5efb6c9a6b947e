"""``python -m multirun`` (and ``composer -n N -m multirun train run.yaml``)."""

import sys

from multirun.cli import main

sys.exit(main())
