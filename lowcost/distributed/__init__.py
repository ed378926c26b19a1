"""``lowcost.distributed``: lowcost under torch.distributed (DDP, FSDP2's ``fully_shard``, torchrun).

lowcost needs no engine of its own here: ``lowcost.apply`` patches the model *before* it is wrapped, and the
wrapped model trains as usual. This package holds what the usual recipe is missing::

    lowcost.apply(model, lora=..., checkpoint=...)            # every rank; ranks must agree (checked)
    lowcost.distributed.shard_model(model, mp_policy=...)     # fully_shard per block, then the root
    lowcost.distributed.seed_rank(1234)                       # dropout masks differ across ranks
    batch = lowcost.distributed.shard_batch(global_batch)     # this rank's rows; world size must divide
    ...train...
    lowcost.save_adapter(model, "out/")                       # every rank calls; rank 0 writes full tensors
    with lowcost.distributed.unsharded(model):                # every rank gathers; one writes the GGUF
        if rank == 0: lowcost.export_gguf(model, "tuned.gguf")
    lowcost.distributed.save_training_state("ckpt/", model, optimizer, step)   # resumable at any world size
    torch.distributed.destroy_process_group()
    lowcost.distributed.exit_skipping_finalisation(0)         # no gloo-thread abort at interpreter exit

Under an initialised process group ``lowcost.apply`` (and ``add_adapter``) is collective: every rank must
call it. To patch a model on one rank alone (evaluation on rank 0 after
training), call it inside ``with lowcost.distributed.this_rank_only():``.

Importing it does not import FSDP or DCP; they are imported when first used.
"""
from lowcost.distributed.batches import local_batch_size, shard_batch
from lowcost.distributed.counting import AllGatherCounter
from lowcost.distributed.exiting import exit_skipping_finalisation
from lowcost.distributed.seeding import rank_seed, seed_rank
from lowcost.distributed.sharding import shard_model, unsharded
from lowcost.distributed.training_state import ResumeInfo, load_training_state, save_training_state
from lowcost.patch.ranks import this_rank_only

__all__ = ["shard_model", "unsharded", "seed_rank", "rank_seed", "local_batch_size", "shard_batch", "AllGatherCounter",
           "save_training_state", "load_training_state", "ResumeInfo", "this_rank_only",
           "exit_skipping_finalisation"]
