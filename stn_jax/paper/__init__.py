"""The paper's experiments, built on the library (`stn_jax`).

* `stn_jax.paper.models`: the paper's models by name;
* `stn_jax.paper.data`: the experiments' data tasks;
* `stn_jax.paper.train`: the one config-driven training loop (`stn_jax.paper.evaluation`: scoring a run).

Nothing in the library imports this package.

**The paper and its sections.** M. Jaderberg, K. Simonyan, A. Zisserman, K.
Kavukcuoglu, "Spatial Transformer Networks", NIPS 2015 (arXiv:1506.02025, the
revision with Appendix A). The code and docs cite it by section: "Sect. 3.1-3.4"
(the method), "Sect. 4.1" distorted MNIST (Table 1), "Sect. 4.2" SVHN (Table 2),
"Sect. 4.3" CUB-200-2011 (Table 3), "A.1" MNIST addition (Table 4), "A.2"
co-localisation, "A.3" 3-D transformers, "A.4"-"A.6" the MNIST, SVHN and CUB
training details.

**Provenance tags**, the one definition used by every docstring, comment, config
and doc of the project, for each value an experiment depends on:

* **[P]** the paper states it (main text, Appendix A.1-A.3, its tables);
* **[S]** a second-hand report of the paper's Appendix A.4-A.6 (write-ups and
  threads quoting it), not checked against the appendix itself: to verify;
* **[R]** independent reimplementations of the paper's recipe agree on it (e.g.
  the authors' public Caffe examples, daerduoCarey/SpatialTransformerLayer, for
  CUB; public distorted-MNIST generators);
* **[U]** unconfirmed: the paper does not say it; our assumption or choice.
"""
