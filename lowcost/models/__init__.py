"""Loading open weights and model-family tables (``lowcost.models.families``)."""
from lowcost.models.loading import LoadInfo, load_pretrained, load_tokenizer  # noqa: F401
