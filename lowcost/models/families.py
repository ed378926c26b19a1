"""Model-family tables; the table itself lives in ``lowcost._families`` (below every layer, so checkpoint,
warmstart and patch can read it without importing upward). Re-exported here, where docs/architecture.md places it."""
from lowcost._families import *  # noqa: F401,F403
from lowcost._families import __all__  # noqa: F401
