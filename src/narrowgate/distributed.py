"""Data-parallel runs: this process's place among torchrun / accelerate launch workers."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from .store import RunLocked

if TYPE_CHECKING:
    from .store import RunStore

_T = TypeVar("_T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among data-parallel workers (torchrun / accelerate launch), from the environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """This process's ranks from RANK, WORLD_SIZE and LOCAL_RANK (one process when unset)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        """Join the process group (gloo on CPU, nccl on GPU) so ranks can wait for each other."""
        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for with one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gpus(self, n_gpus: int, local_world: int) -> list[int]:
        """The GPUs of this rank's group when each model spans several: n_gpus // local_world each."""
        per = n_gpus // max(1, local_world)
        if per < 1:
            raise ValueError(f"{local_world} processes per node but only {n_gpus} GPUs.")
        return list(range(self.local_rank * per, (self.local_rank + 1) * per))

    def shard(self, units: Iterable[_T]) -> Iterable[_T]:
        """This rank's units: every ``world``-th of the full, ordered list or stream (stable across resumes)."""
        if isinstance(units, list):
            return units[self.rank :: self.world]
        return itertools.islice(units, self.rank, None, self.world)

    def share(self, value: _T) -> _T:
        """Rank 0's ``value``, on every rank (a picklable object through the process group)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def lock(self, store: RunStore, command: str) -> None:
        """Take ``store``'s directory lock on rank 0 for every rank, or raise `RunLocked` on every rank."""
        refused = None
        if self.rank == 0:
            try:
                store.lock(command)
            except RunLocked as e:
                refused = str(e)
        refused = self.share(refused)
        if refused:
            raise RunLocked(refused)
