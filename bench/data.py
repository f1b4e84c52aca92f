"""Batching: seeded shuffling, optionally grouping rows of similar length to cut padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of rows with similar lengths (the idea of HF Trainer's `group_by_length`).

    Each epoch: shuffle all rows; cut the order into mega-batches of `batch_size × mega_batches` rows; sort each
    mega-batch by length; split it into batches; shuffle the batches of the mega-batch. Every row is seen once per
    epoch and the composition is random at the scale of a mega-batch, while padding shrinks to the length spread
    inside a batch. Deterministic given the generator's seed.

    Args:
        lengths: a length proxy per row (characters or tokens).
        batch_size: rows per batch.
        generator: the seeded generator that drives all shuffles.
        mega_batches: batches per sorted mega-batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 mega_batches: int = 50) -> None:
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.generator, self.mega = batch_size, generator, mega_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator)
        for mega in order.split(self.batch_size * self.mega):
            mega = mega[self.lengths[mega].argsort(descending=True, stable=True)]
            batches = list(mega.split(self.batch_size))
            for i in torch.randperm(len(batches), generator=self.generator).tolist():
                yield batches[i].tolist()
