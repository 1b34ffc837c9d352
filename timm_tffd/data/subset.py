"""``SampledSubset``: a fixed, seeded random subset of a map-style dataset, for smoke tests and quick runs.

Unlike ``torch.utils.data.Subset`` it forwards ``transform`` / ``target_transform`` to the wrapped dataset, so
``timm.data.create_loader`` can still set the transforms on it.
"""
from typing import Any

import torch
import torch.utils.data

__all__ = ['SampledSubset']


class SampledSubset(torch.utils.data.Dataset):
    """The same ``min(num_samples, len(dataset))`` samples of ``dataset`` for a given seed, in the dataset's order.

    Every process that builds it with the same seed gets the same samples (distributed ranks included).

    Args:
        dataset: A map-style dataset.
        num_samples: How many samples to keep at most.
        seed: Seed of the random choice.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, num_samples: int, seed: int = 0):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, '__len__'):
            raise ValueError(f'a subset needs a map-style dataset with a length, got {type(dataset).__name__}')
        if num_samples < 1:
            raise ValueError(f'subset size must be >= 1, got {num_samples}')
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(dataset), generator=generator)[:num_samples]
        self.dataset = dataset
        self.indices = chosen.sort().values.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value

    @property
    def target_transform(self):
        return self.dataset.target_transform

    @target_transform.setter
    def target_transform(self, value):
        self.dataset.target_transform = value
