"""The shipped toy models: tiny Stable-Diffusion-1.x-shaped text-to-image models, the product's embedded default.

``python -m spm demo``, ``python -m spm.ui`` and ``spm eval`` load them; the benchmarks in ``bench/`` import them
(never the other way round). Building the toy worlds from scratch, rendering their data and training their scorers
stays in ``bench/toyworld``.

* :mod:`spm.toy.model`     configs and the pipeline loader (diffusers folders under ``assets/<world>/``)
* :mod:`spm.toy.captions`  the label space and captions: the concepts the toy models know
* :mod:`spm.toy.scorer`    the classifier that reads generated toy images
* :mod:`spm.toy.harness`   generation, prompt suites, scoring helpers; :mod:`spm.toy.evaluate`: ``spm eval``
"""
