"""Every named augmentation, including the contrastive key views, ends in a normalized float tensor."""
import numpy as np
import pytest
import torch

from train.data.transforms import AUGMENTATIONS, train_transform
from train.models import ModelSpec


@pytest.mark.parametrize("name", [a for a in AUGMENTATIONS if a not in ("cifar", "cifar-basic", "none")])
@pytest.mark.parametrize("size", [32, 64])
def test_named_augmentations_give_normalized_tensors_of_the_input_size(name, size):
    spec = ModelSpec(input_size=size, resize=size)
    torch.manual_seed(0)
    image = np.random.RandomState(0).randint(0, 256, (48, 40, 3), dtype=np.uint8)
    outs = [train_transform(name, spec)(image) for _ in range(3)]
    assert all(o.shape == (3, size, size) and o.dtype == torch.float32 and o.min() < 0 < o.max() for o in outs)
    assert not torch.equal(outs[0], outs[1])  # random draws
