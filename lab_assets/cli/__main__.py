"""`python -m lab_assets.cli ...` is `lab ...`."""

import sys

from lab_assets.cli.main import main

sys.exit(main())
