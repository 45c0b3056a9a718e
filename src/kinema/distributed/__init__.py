"""Scale-out: one video over N processes (sequence- and CFG-parallel), many videos over a Ray
cluster (:mod:`kinema.batch`), and multi-process training helpers (:mod:`.train`)."""

from kinema.distributed.parallel import (
    BroadcastTextEncoder,
    Mesh,
    ParallelConfig,
    ParallelDiT,
    SplitDecodeVAE,
    build_mesh,
    init_distributed,
    plan_parallel,
    sequence_parallel_forward,
)

__all__ = [
    "BroadcastTextEncoder",
    "Mesh",
    "ParallelConfig",
    "ParallelDiT",
    "SplitDecodeVAE",
    "build_mesh",
    "init_distributed",
    "plan_parallel",
    "sequence_parallel_forward",
]
