"""``python -m lowcost`` is the ``lowcost`` command (so ``torchrun -m lowcost finetune ...`` works too)."""
import sys

from lowcost.cli import main

sys.exit(main())
