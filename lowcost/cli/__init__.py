"""Command-line entry points (``python -m lowcost.cli.demo``)."""
