"""Machine translation of training pairs (``python -m hybrid_retrieval.translate``): seq2seq models (NLLB-200,
M2M100, Marian) run on length-sorted batches through a resumable cache; see :mod:`.stage` for the steps."""
