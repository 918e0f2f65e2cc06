"""The paper's two classification networks (paper Sect. 4.1): an FCN and a CNN, three weight layers each.

Both take ``(B, H, W, C)`` channels-last inputs and return ``(B, num_classes)``
logits. Their ``width`` (units of each hidden FC layer, filters of each conv)
is chosen by the model factories from a parameter budget
(`stn_jax.paper.models.solve_width`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from stn_jax.conv import conv_general_dilated
from stn_jax.layers import Flatten, pool, pooled_size


class FCNClassifier(nnx.Module):
    """flatten -> FC(width) -> ReLU -> FC(width) -> ReLU -> FC(num_classes)."""

    def __init__(self, input_shape: Sequence[int], width: int, num_classes: int, *, rngs: nnx.Rngs):
        input_shape = tuple(int(s) for s in input_shape)
        self.input_shape, self.width = input_shape, int(width)
        self.flatten = Flatten(len(input_shape))
        self.fc1 = nnx.Linear(math.prod(input_shape), width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    @staticmethod
    def describe(input_shape: Sequence[int], width: int, num_classes: int) -> str:
        return f"FC {width} > ReLU > FC {width} > ReLU > FC {num_classes}"

    def __call__(self, x):
        x = jax.nn.relu(self.fc1(self.flatten(x)))
        x = jax.nn.relu(self.fc2(x))
        return self.out(x)


class CNNClassifier(nnx.Module):
    """conv KxK (valid) -> ReLU -> max-pool 2 -> conv KxK (valid) -> ReLU -> max-pool 2 -> FC(num_classes).

    Kernel sizes `KERNELS` (the paper's 9x9 and 7x7); both convs have ``width``
    filters, computed as patches x kernel on CPU (`stn_jax.conv`). The max-pools
    use ceil mode (an incomplete last window is kept), which makes the paper's
    RTS shapes work (42 -> avg-pool 21 -> conv 13 -> pool 7 -> conv 1 -> pool 1);
    see docs/models.md.
    """

    KERNELS = (9, 7)

    def __init__(self, input_shape: Sequence[int], width: int, num_classes: int, *, rngs: nnx.Rngs):
        input_shape = tuple(int(s) for s in input_shape)
        feat = self.feature_shape(input_shape, width)
        self.input_shape, self.width = input_shape, int(width)
        k1, k2 = self.KERNELS
        conv = dict(padding="VALID", conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.conv1 = nnx.Conv(input_shape[-1], width, (k1, k1), **conv)
        self.conv2 = nnx.Conv(width, width, (k2, k2), **conv)
        self.flatten = Flatten(3)
        self.out = nnx.Linear(math.prod(feat), num_classes, rngs=rngs)

    @classmethod
    def _layers(cls) -> str:
        k1, k2 = cls.KERNELS
        return f"conv {k1}x{k1} > pool 2 > conv {k2}x{k2} > pool 2"

    @classmethod
    def feature_shape(cls, input_shape: Sequence[int], width: int) -> tuple[int, int, int]:
        """The ``(h, w, width)`` feature map before the last FC layer (ValueError if the input is too small)."""
        if len(input_shape) != 3:
            raise ValueError(f"CNNClassifier: input_shape must be (H, W, C), got {tuple(input_shape)}")
        size = list(input_shape[:2])
        for k in cls.KERNELS:
            size = [n - k + 1 for n in size]
            if min(size) < 1:
                need = pooled_size_inverse(cls.KERNELS)
                raise ValueError(f"CNNClassifier: input {tuple(input_shape)} is too small for {cls._layers()} "
                                 f"(it needs at least {need}x{need} after any pooling before it)")
            size = [pooled_size(n, 2, True) for n in size]
        return (size[0], size[1], int(width))

    @classmethod
    def describe(cls, input_shape: Sequence[int], width: int, num_classes: int) -> str:
        h, w, _ = cls.feature_shape(input_shape, width)
        k1, k2 = cls.KERNELS
        return (f"conv {width}@{k1}x{k1} > ReLU > max-pool 2 (ceil) > conv {width}@{k2}x{k2} > ReLU > "
                f"max-pool 2 (ceil) > [{h}x{w}x{width}] > FC {num_classes}")

    def __call__(self, x):
        x = pool(jax.nn.relu(self.conv1(x)), 2, kind="max", ceil=True)
        x = pool(jax.nn.relu(self.conv2(x)), 2, kind="max", ceil=True)
        return self.out(self.flatten(x))


def pooled_size_inverse(kernels: Sequence[int]) -> int:
    """The smallest input side that survives ``conv k -> ceil-pool 2`` for each kernel ``k`` in turn."""
    n = 1
    for k in reversed(kernels):
        n = 2 * n - 1 + k - 1  # ceil-pool 2 of m >= n needs m >= 2n - 1; a valid conv k adds k - 1
    return n


CLASSIFIERS = {"fcn": FCNClassifier, "cnn": CNNClassifier}
