"""hybrid_retrieval: hybrid batch training and evaluation of multilingual dense retrievers.

Commands (``python -m hybrid_retrieval.<name>``, and ``run.py`` for training): ``adapt``, ``deliver``, ``encode``,
``evaluate``, ``export``, ``mine``, ``mteb``, ``options``, ``prepare``, ``report``, ``search``, ``translate``; each is
a thin driver on :func:`hybrid_retrieval.cli.hydra_main`. Below them: ``training/`` (the LightningModule,
datamodule, sampler and callbacks), then the libraries (``data/``, ``models/``, ``losses/``, ``evaluation/``,
``reporting/``, ``adaptation/``, ``translation/``, ``tracking``, ``run_folder``), then the base (``config_error``,
``storage``, ``progress``, ``distributed``, ``hardware``, ``kernels/``, ``upgrade``). No module imports from a
floor above its own (docs/extending.md#how-the-package-is-layered).
"""
