"""MNIST-family data for the paper's experiments (docs/data.md).

* `make_dataset(config.data, seed=..., global_batch_size=..., process_index=..., process_count=...,
  cache_dir=...)` -> `MnistDataset` with ``train_batch(step)``, ``test_set()``,
  ``test_batches(batch_size)``, ``element_spec``, ``num_classes``, ``image_shape``.
* `default_config(task)`: the data section of a task, every parameter with the digest's values.
* `load_mnist(source, split, data_dir=None, manual_dir=None)`: MNIST from tensorflow-datasets
  (``source="tfds"``) or a folder of the four IDX files.
* `stn_jax.data.distortions`: the distortions as pure JAX functions of a key.

Tasks: ``r``, ``rts``, ``p``, ``e``, ``tc`` (distorted MNIST), ``addition``,
``mnist3d``, ``coloc`` (co-localisation).
"""

from stn_jax.data import distortions
from stn_jax.data.mnist import MnistSourceError, load_idx_folder, load_mnist, load_tfds_mnist, network_available
from stn_jax.data.pipeline import TASKS, MnistDataset, canonical_order, default_config, make_dataset

__all__ = [
    "TASKS", "MnistDataset", "MnistSourceError", "canonical_order", "default_config", "distortions",
    "load_idx_folder", "load_mnist", "load_tfds_mnist", "make_dataset", "network_available",
]
