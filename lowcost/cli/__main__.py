"""``python -m lowcost.cli`` is the ``lowcost`` command."""
from lowcost.cli import program

program()
