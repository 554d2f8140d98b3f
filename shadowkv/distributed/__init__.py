"""Tensor parallelism on torch.distributed (gloo on CPU, NCCL on CUDA).

``group.py``: this process's rank and world (``TPGroup``); ``shard.py``: a loaded
``LlamaModel`` turned into rank r of N in place (column-parallel q/k/v and gate/up, row-parallel
o_proj and down_proj with one all-reduce each, embeddings and LM head replicated);
``layers.py``: the row-parallel projection; ``launch.py``: N processes with a process group each,
a failure or a hang in any of them ends all of them with one error (``spawn_workers``: the same
for ranks 1..N-1 while the calling process is rank 0); ``engine.py``: the engine on N ranks
(``EngineConfig.tensor_parallel``): rank 0's ``TPEngine`` broadcasts each step's commands, the
other ranks follow in ``worker_loop``.
"""

from shadowkv.distributed.group import TPGroup, backend_for, current_group
from shadowkv.distributed.launch import TPRankError, Workers, run_ranks, spawn_workers
from shadowkv.distributed.shard import TPShapeError, check_divisible, shard_model

__all__ = [
    "TPGroup",
    "TPRankError",
    "TPShapeError",
    "Workers",
    "backend_for",
    "check_divisible",
    "current_group",
    "run_ranks",
    "shard_model",
    "spawn_workers",
]
