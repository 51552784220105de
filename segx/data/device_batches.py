"""Batches drawn from a split that lives on the training device: no DataLoader, no workers, no copies.

A cached split of a few thousand images at 128 × 128 is some 100 MB of uint8, so it is moved to the GPU
once and every batch is an index into it; conversion, augmentation and normalisation then run on the
device too (`CachedSegmentationDataModule.on_after_batch_transfer`). On the CPU it saves the DataLoader's
per-batch work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler

EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with generator seed s * stride + e


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                pad: bool = True) -> torch.Tensor:
    """The image indices one rank sees in one epoch (int64, CPU): a permutation drawn from (seed, epoch) when
    shuffling, then every `world_size`-th entry from `rank`. With `pad` the order is first extended by its own
    start to a multiple of `world_size` (as PyTorch's DistributedSampler does), so all ranks get as many."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1:
        if pad:
            total = math.ceil(n / world_size) * world_size
            order = order.repeat(math.ceil(total / n))[:total]
        order = order[rank::world_size]
    return order


class EpochOrderSampler(DistributedSampler):
    """`epoch_order` for a DataLoader: the path for data kept off the device sees the same batches as
    `DeviceBatches`. A DistributedSampler subclass, so Lightning does not wrap it in another one."""

    def __init__(self, n: int, shuffle: bool, seed: int, epoch: Callable[[], int], rank: int = 0,
                 world_size: int = 1, pad: bool = True) -> None:
        self.n, self.shuffle, self.seed, self.epoch_of = n, shuffle, seed, epoch
        self.rank, self.num_replicas, self.pad = rank, world_size, pad

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.shuffle, self.seed, int(self.epoch_of()), self.rank, self.num_replicas,
                                self.pad).tolist())

    def __len__(self) -> int:
        return len(epoch_order(self.n, False, 0, 0, self.rank, self.num_replicas, self.pad))

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch; the order follows the trainer's epoch (`epoch`) instead."""


class DeviceBatches:
    """An iterable of (images uint8 [B,3,H,W], masks uint8 [B,H,W]) batches, already on the split's device.

    `shuffle` draws a new order every epoch from (seed, epoch), so a resumed run sees the batches it would
    have seen. Under DDP (`world_size` > 1) every rank takes a disjoint shard of that order: with `pad`, each
    rank gets the same number of batches (the order is extended by its own start, as PyTorch's
    DistributedSampler does, so no rank waits at a collective); without `pad` (validation) every image is
    seen exactly once and shards may differ by one image. Batches stay NCHW: normalising is much faster
    in that layout on the CPU (see `Normalize`), and the module converts the float batch for the network.
    """

    def __init__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.images = images.contiguous()
        self.masks = masks.contiguous()
        self.batch_size = int(batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.rank, self.world_size, self.pad = int(rank), int(world_size), bool(pad)
        self.epoch = epoch or (lambda: 0)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch."""
        return len(epoch_order(len(self.masks), False, 0, 0, self.rank, self.world_size, self.pad))

    def order(self) -> torch.Tensor:
        """This rank's image indices for the current epoch (int64, on the CPU)."""
        return epoch_order(len(self.masks), self.shuffle, self.seed, int(self.epoch()), self.rank, self.world_size,
                           self.pad)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        contiguous = not self.shuffle and self.world_size == 1  # plain slices: views, no copy at all
        index = order.to(self.device, non_blocking=True)
        for begin in range(0, len(order), self.batch_size):
            if contiguous:
                images = self.images[begin:begin + self.batch_size]
                masks = self.masks[begin:begin + self.batch_size]
            else:
                rows = index[begin:begin + self.batch_size]
                images, masks = self.images.index_select(0, rows), self.masks.index_select(0, rows)
            yield images, masks
