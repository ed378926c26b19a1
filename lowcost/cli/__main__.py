"""``python -m lowcost.cli`` is the ``lowcost`` command."""
import sys

from lowcost.cli import main

sys.exit(main())
