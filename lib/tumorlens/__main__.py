"""``python -m tumorlens``: the same as the ``tumorlens`` command."""

import sys

from tumorlens.cli import main

sys.exit(main())
