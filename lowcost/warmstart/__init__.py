"""Warm starts: initialise what is new in a model from what is already trained.

    model = lowcost.load_pretrained(path)               # frozen; HF directory or .gguf (lowcost.models)
    tokenizer = lowcost.load_tokenizer(path)
    report = lowcost.warmstart.embeddings(model, tokenizer, new_tokens=words, vectors="ft.bin")  # the next two
    report = lowcost.warmstart.add_tokens(model, tokenizer, words)          # new tokens = mean of old pieces
    report = lowcost.warmstart.import_vectors(model, tokenizer, "vec.txt")  # word2vec/GloVe/fastText/model
    report = lowcost.warmstart.transplant(model, source, mapping=None)      # by name, partial copy
    model = lowcost.warmstart.grow(model, width=..., depth=...)             # function-preserving
    schedule = lowcost.warmstart.FreezeThenUnfreeze(model, report.new, warm_steps=100)

Every call returns (or attaches) a ``WarmstartReport``. ``load_pretrained``/``load_tokenizer`` are
``lowcost.load_pretrained``/``lowcost.load_tokenizer`` (``lowcost.models``, a layer above this one).
"""
from lowcost.warmstart.import_vectors import import_vectors
from lowcost.warmstart.grow import grow
from lowcost.warmstart.report import NewSlice, WarmstartReport
from lowcost.warmstart.schedule import FreezeThenUnfreeze
from lowcost.warmstart.tokens import add_tokens
from lowcost.warmstart.transplant import transplant
from lowcost.warmstart.vectors import VectorFormatError, detect_format, iter_vectors, read_vectors
from lowcost.warmstart.warm_embeddings import embeddings

__all__ = ["embeddings", "add_tokens", "import_vectors", "transplant", "grow", "FreezeThenUnfreeze",
           "WarmstartReport", "NewSlice", "VectorFormatError", "detect_format", "iter_vectors", "read_vectors"]
