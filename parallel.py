"""Data parallelism over torchrun's processes: each process runs its share of a micro-batch, and
FSDP2 shards the frozen base weights. In one process every method hands its input back unchanged.

    torchrun --nproc_per_node 2 train.py ...
"""

import math
import os
from dataclasses import dataclass

import torch

from lora import lora_parameters


@dataclass
class Processes:
    """Data parallelism over torchrun's processes. With one process every method is the identity.

    Every collective a run uses lives here, and each one runs on every process, in the same order,
    whatever that process's data: a process that skipped one would leave the others waiting.
    """

    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls) -> "Processes":
        """Join torchrun's process group when launched with several processes."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world)

    def split(self, n: int) -> bool:
        """A batch of n is split over the processes when each gets a sample; else each runs it all."""
        return self.world > 1 and n >= self.world

    def share(self, batch: list) -> list:
        return batch[self.rank :: self.world] if self.split(len(batch)) else batch

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole-batch tensor (B, ...)."""
        return rows[self.rank :: self.world] if self.split(len(rows)) else rows

    def replicated_scale(self, n: int) -> float:
        """1/world when every process runs the whole batch, so that the summed gradients count it once."""
        return 1.0 if self.world == 1 or self.split(n) else 1.0 / self.world

    def gather(self, batch: list, *rows: torch.Tensor) -> list[torch.Tensor]:
        """Each process's rows (b, A) -> the whole batch's (B, A), in batch order, on every process."""
        if not self.split(len(batch)):
            return list(rows)
        import torch.distributed as dist

        B, per = len(batch), math.ceil(len(batch) / self.world)  # shares differ by at most one row
        stacked = torch.stack([r.float() for r in rows], dim=-1)  # (b, A, k)
        buf = stacked.new_zeros((per,) + stacked.shape[1:])
        buf[: len(stacked)] = stacked
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        whole = stacked.new_zeros((B,) + stacked.shape[1:])
        for r, part in enumerate(parts):
            n = len(range(r, B, self.world))
            whole[r :: self.world] = part[:n]
        return [whole[..., i].to(x.dtype) for i, x in enumerate(rows)]

    def sum_grads(self, params: list) -> None:
        """LoRA weights are replicated, not sharded: add up their gradients by hand."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (e.g. Ctrl-C reached only some of them)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def all_same(self, ok: bool) -> bool:
        """Whether `ok` holds on every process."""
        return not self.any(not ok)

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every process's copy of a same-shaped tensor, e.g. its RNG state (for checkpoints)."""
        if self.world == 1:
            return [t]
        import torch.distributed as dist

        t = t.to(self.device())
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        return [p.cpu() for p in parts]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> torch.device:
        """Where collectives' tensors live: the GPU under nccl, the CPU under gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2: shard each decoder layer's frozen weights over the processes.

    LoRA weights stay whole on every process (they are tiny, fp32, and their gradients are summed by
    hand), and so do embeddings, final norm and head, which the chunked loss reads outside forward.
    Sharding those as FSDP's root would not lower peak memory: FSDP2 keeps the root's weights gathered
    from forward through backward, and a frozen base has no root gradients or optimizer state to shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(model.lm_head.weight.device.type, (world,))
    lora = set(lora_parameters(model))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, ignored_params=lora & set(block.parameters()))
