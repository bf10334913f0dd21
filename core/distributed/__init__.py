"""Tensor parallelism: who this process is in the group (:mod:`.parallel_state`, asked by
``vlm.nn``'s sharded layers) and how rank 0 starts and drives its workers (:mod:`.driver`)."""

from vlm.distributed.parallel_state import all_gather_last_dim, all_reduce, divide, tp_rank, tp_world_size

__all__ = ["all_gather_last_dim", "all_reduce", "divide", "tp_rank", "tp_world_size"]
