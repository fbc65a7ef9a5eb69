"""Adaptation stages run before retrieval training: continued masked language modelling (:mod:`.mlm`)."""

from hybrid_retrieval.adaptation.mlm import (AdaptConfigError, MLMSettings, adapt_encoder, adapt_tags,
                                             check_adapt_config, load_adapt_texts)

__all__ = ["AdaptConfigError", "MLMSettings", "adapt_encoder", "adapt_tags", "check_adapt_config",
           "load_adapt_texts"]
