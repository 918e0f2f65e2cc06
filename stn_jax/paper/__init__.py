"""The paper's experiments, built on the library (`stn_jax`).

* `stn_jax.paper.models`: the paper's models by name;
* `stn_jax.paper.data`: the experiments' data tasks;
* `stn_jax.paper.train`: the one config-driven training and evaluation loop.

Nothing in the library imports this package.
"""
