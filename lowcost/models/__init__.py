"""Loading open weights and model-family tables (``lowcost.models.families``)."""
