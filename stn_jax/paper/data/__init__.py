"""The experiments' data (docs/data.md): a registry of tasks and one data-set interface.

* `make_dataset(config.data, seed=..., global_batch_size=..., process_index=..., process_count=...,
  cache_dir=...)`: the data set of a task (`stn_jax.paper.data.tasks` gives the interface).
* `TASKS`: the registry (``r``, ``rts``, ``p``, ``e``, ``tc`` distorted MNIST, ``addition``,
  ``mnist3d``, ``coloc`` co-localisation and ``coloc_set`` its fixed sets of one class, ``svhn`` format-1
  house numbers, ``svhn_synth`` their synthetic stand-in); `default_config(task)`: a task's options with
  defaults.
* `load_mnist(source, split, data_dir=None, manual_dir=None)`: MNIST from tensorflow-datasets
  (``source="tfds"``) or a folder of the four IDX files.
* `stn_jax.paper.data.distortions`: the distortions as pure JAX functions of a key.
"""

from stn_jax.paper.data import coloc, cub, distortions, mnist_tasks, svhn  # noqa: F401  (they register their tasks)
from stn_jax.paper.data.mnist import MnistSourceError, load_idx_folder, load_mnist, load_tfds_mnist, network_available
from stn_jax.paper.data.pipeline import MnistDataset, balanced_order, canonical_order
from stn_jax.paper.data.tasks import TASKS, Dataset, DataTask, default_config, make_dataset, resolve_options

__all__ = [
    "TASKS", "DataTask", "Dataset", "MnistDataset", "MnistSourceError", "balanced_order", "canonical_order",
    "default_config", "distortions", "load_idx_folder", "load_mnist", "load_tfds_mnist", "make_dataset",
    "network_available", "resolve_options",
]
