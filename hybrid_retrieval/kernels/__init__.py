"""CPU speed code that reaches into third-party modules, kept apart from the model definitions.

Each module says what it patches and how it is undone:

- :mod:`~hybrid_retrieval.kernels.unpadded`: the backbone's forward on real tokens only (transformers' BERT and
  XLM-R layers run through their weights, not their ``forward``); ``model.unpad=false`` runs the padded forward.
- :mod:`~hybrid_retrieval.kernels.onednn`: oneDNN linear layers swapped in by class for the length of an fp32
  CPU encoding, restored on exit; safe for threads sharing one model.
- :mod:`~hybrid_retrieval.kernels.dropout`: dropout masks drawn on the CPU from torch's generator (equal in
  distribution to torch's own).
"""
