"""``python -m lowcost`` is the ``lowcost`` command (so ``torchrun -m lowcost finetune ...`` works too)."""
from lowcost.cli import program

program()
