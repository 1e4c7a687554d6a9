"""The data order: per epoch, each bucket's examples shuffled and cut into batches, the batches
shuffled — a pure function of (seed, epoch), so a checkpoint stores only (epoch, position)."""

from __future__ import annotations

import random


def epoch_batches(buckets: list[tuple[int, int]], batch: int, seed: int, epoch: int) -> list[list[int]]:
    rng = random.Random(f"{seed}/{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).append(index)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches += [indices[i:i + batch] for i in range(0, len(indices), batch)]
    rng.shuffle(batches)
    return batches


class DataOrder:
    """Yields batches forever, epoch after epoch; `position` is where a resumed run starts."""

    def __init__(self, buckets, batch: int, seed: int, epoch: int = 0, position: int = 0):
        self.buckets, self.batch, self.seed = buckets, batch, seed
        self.epoch, self.position = epoch, position

    def next(self) -> list[int]:
        batches = epoch_batches(self.buckets, self.batch, self.seed, self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = epoch_batches(self.buckets, self.batch, self.seed, self.epoch)
        self.position += 1
        return batches[self.position - 1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}
