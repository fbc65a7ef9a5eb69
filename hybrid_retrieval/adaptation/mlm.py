"""Domain adaptation by continued masked language modelling (MLM) of an encoder's backbone, in plain PyTorch.

:func:`adapt_encoder` trains ``encoder.backbone`` in place on unlabelled text (``adapt.text``, see
:mod:`hybrid_retrieval.data.text`); pooling, dense head and prefixes of the :class:`Encoder` are untouched, so
the adapted encoder is exported and fine-tuned like any other.

- **Head.** Retrieval checkpoints (multilingual-E5, this project's tiny model) have no MLM head. :class:`MLMHead`
  is BERT's / XLM-R's (dense -> activation -> LayerNorm -> decoder), its decoder weight tied to (the same
  Parameter as) the backbone's input embeddings, as in pretraining. ``head: auto`` loads a checkpoint's own
  head (``lm_head.*`` of XLM-R/RoBERTa, ``cls.predictions.*`` of BERT) from the folder the backbone was loaded
  from when it has one; ``head: new`` always starts a fresh one.
- **Head warm-up.** A fresh head predicts noise, and its gradients in the first steps would push the encoder
  towards whatever the random head needs. So a new head's output bias starts at the log unigram frequencies of
  the training text (:func:`unigram_log_prior`), and ``head_warmup_steps`` steps first train only the new head
  (dense, LayerNorm, output bias) on the frozen encoder (run without gradients, dropout off); the tied embedding
  matrix stays frozen too. Skipped when the head was loaded from the checkpoint. Measured on me5_small and
  MLQA-R paragraphs (batches of 8 x 64 tokens): held-out loss 13.6 with a zero bias, 10.8 with the prior, and
  after 60 warm-up steps 9.25 without / 8.93 with it.
- **Masking.** Each token (``whole_word: false``) or each word (``whole_word: true``, words as the fast
  tokenizer's pre-tokenizer splits them: whitespace-separated for XLM-R's SentencePiece) is chosen with
  probability ``masking_rate``, so every non-special token is masked with exactly that probability in both modes.
  Chosen tokens become ``<mask>`` with probability ``mask_token_prob``, a random non-special token with
  ``random_token_prob``, and stay as they are otherwise (BERT's 80/10/10). Texts are read without the
  query/passage prefixes.
- **Held-out text.** ``heldout_size`` texts (a seeded sample) are kept out of training, masked once with
  ``heldout_mask_seed``; the same masked batches give the loss before (after the head warm-up: the original
  encoder with a fitted head) and after adaptation, token-weighted over all masked tokens, and perplexity =
  exp(loss).
- **Optimisation.** AdamW (no decay on biases and LayerNorm), linear warm-up over ``warmup_ratio`` of ``steps``
  then linear decay to 0, gradient clipping, ``freeze_embeddings`` to keep the vocabulary matrix (and so the
  tied decoder) fixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybrid_retrieval.adaptation.config import MLMSettings
from hybrid_retrieval.config_error import BadValue
from hybrid_retrieval.kernels.unpadded import packed_forward, unsupported_reason
from hybrid_retrieval.progress import Progress

__all__ = ["METHODS", "AdaptConfigError", "MLMHead", "MLMSettings", "adapt_encoder", "adapt_tags",
           "build_mlm_head", "check_adapt_config", "load_adapt_texts", "mask_tokens", "mlm_settings",
           "split_heldout", "train_mlm", "unigram_log_prior", "warm_up_head"]

METHODS = ("none", "mlm")
log = logging.getLogger(__name__)
HEADS = ("auto", "new")
LogMetrics = Callable[[Mapping[str, float], int], None]


class AdaptConfigError(ValueError):
    """An ``adapt`` option that cannot work; the message names it and what was expected."""


def _check(condition: bool, option: str, expected: str, value: Any) -> None:
    if not condition:
        raise AdaptConfigError(f"adapt.{option}={value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mlm_settings(adapt_cfg: Mapping[str, Any]) -> MLMSettings:
    """:class:`MLMSettings` from an ``adapt`` config (``method: mlm``), every value checked."""
    known = {f.name for f in fields(MLMSettings)}
    values = {k: v for k, v in adapt_cfg.items() if k in known}
    unknown = sorted(set(adapt_cfg) - known - {"method", "text"})
    if unknown:
        raise AdaptConfigError(f"adapt: unknown option(s) {unknown}; expected method, text, {sorted(known)}")
    s = MLMSettings(**values)
    for name in ("steps", "batch_size", "log_every", "heldout_size"):
        _check(_is_int(getattr(s, name)) and getattr(s, name) >= 1, name, "a positive integer", getattr(s, name))
    for name in ("head_warmup_steps", "heldout_mask_seed", "seed"):
        _check(_is_int(getattr(s, name)) and getattr(s, name) >= 0, name, "an integer >= 0", getattr(s, name))
    _check(_is_int(s.max_length) and s.max_length >= 3, "max_length", "an integer >= 3 (tokens, specials "
           "included)", s.max_length)
    for name in ("lr", "head_lr"):
        _check(_is_number(getattr(s, name)) and getattr(s, name) > 0, name, "a positive number", getattr(s, name))
    for name in ("weight_decay", "grad_clip"):
        _check(_is_number(getattr(s, name)) and getattr(s, name) >= 0, name, "a number >= 0 (0: off for "
               "grad_clip)", getattr(s, name))
    _check(_is_number(s.warmup_ratio) and 0 <= s.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)",
           s.warmup_ratio)
    _check(_is_number(s.masking_rate) and 0 < s.masking_rate < 1, "masking_rate", "a number in (0, 1)",
           s.masking_rate)
    for name in ("mask_token_prob", "random_token_prob"):
        _check(_is_number(getattr(s, name)) and 0 <= getattr(s, name) <= 1, name, "a probability in [0, 1]",
               getattr(s, name))
    _check(s.mask_token_prob + s.random_token_prob <= 1, "random_token_prob",
           f"at most 1 - mask_token_prob = {1 - s.mask_token_prob:g}", s.random_token_prob)
    for name in ("whole_word", "freeze_embeddings"):
        _check(isinstance(getattr(s, name), bool), name, "true or false", getattr(s, name))
    _check(s.head in HEADS, "head", f"one of {HEADS}", s.head)
    return s


def _container(adapt_cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(adapt_cfg, DictConfig):
            return OmegaConf.to_container(adapt_cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(adapt_cfg)


def check_adapt_config(adapt_cfg: Any, eval_datasets: Sequence[str] = ()) -> MLMSettings | None:
    """Check an ``adapt`` config before any work: the settings for ``method: mlm``, None for ``method: none``.

    `eval_datasets`: names of the datasets the run evaluates on (a ``lareqa``/``tatoeba`` text source naming one
    of them is refused: that overlap must be chosen as ``source: eval_corpus``).
    """
    from hybrid_retrieval.data.text import TextSourceError, check_text_options

    cfg = _container(adapt_cfg)
    method = cfg.get("method")
    _check(method in METHODS, "method", f"one of {METHODS}", method)
    if method == "none":
        defaults = {f.name: f.default for f in fields(MLMSettings)}
        unused = sorted(k for k, v in cfg.items()
                        if (k == "text" and v is not None) or (k in defaults and v != defaults[k]))
        if unused:  # a sweep over adapt=none,mlm sets the MLM options for both arms
            log.info("adapt=none: %s not used (no adaptation stage)", ", ".join(f"adapt.{k}" for k in unused))
        return None
    if not isinstance(cfg.get("text"), Mapping):
        raise AdaptConfigError(f"adapt.text={cfg.get('text')!r}: expected a mapping with at least `source` (see "
                               "conf/adapt/mlm.yaml)")
    try:
        check_text_options(cfg["text"], eval_datasets)
    except TextSourceError as error:
        raise AdaptConfigError(str(error)) from error
    return mlm_settings(cfg)


# ------------------------------------------------------------------------------------------------------ head


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder, the decoder's weight tied to the input embeddings."""

    def __init__(self, embeddings: nn.Embedding, hidden_size: int, activation: str = "gelu",
                 layer_norm_eps: float = 1e-12, initializer_range: float = 0.02) -> None:
        from transformers.activations import ACT2FN

        super().__init__()
        width = embeddings.embedding_dim
        self.dense = nn.Linear(hidden_size, width)
        self.activation = ACT2FN[activation]
        self.layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.decoder = nn.Linear(width, embeddings.num_embeddings, bias=False)
        self.decoder.weight = embeddings.weight  # tied: the same Parameter, so the same storage
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))
        nn.init.normal_(self.dense.weight, std=initializer_range)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.activation(self.dense(hidden)))) + self.bias

    def own_parameters(self) -> list[nn.Parameter]:
        """The head's parameters without the tied decoder weight (which belongs to the backbone)."""
        return [self.dense.weight, self.dense.bias, self.layer_norm.weight, self.layer_norm.bias, self.bias]


# Checkpoint keys of each head parameter (alternatives in order: older conversions say gamma/beta, or keep the
# output bias as decoder.bias), for the families whose pretraining checkpoints carry an MLM head.
_HEAD_KEYS: dict[str, dict[str, tuple[str, ...]]] = {
    "lm_head.": {"dense.weight": ("dense.weight",), "dense.bias": ("dense.bias",),
                 "layer_norm.weight": ("layer_norm.weight",), "layer_norm.bias": ("layer_norm.bias",),
                 "bias": ("bias", "decoder.bias")},
    "cls.predictions.": {"dense.weight": ("transform.dense.weight",), "dense.bias": ("transform.dense.bias",),
                         "layer_norm.weight": ("transform.LayerNorm.weight", "transform.LayerNorm.gamma"),
                         "layer_norm.bias": ("transform.LayerNorm.bias", "transform.LayerNorm.beta"),
                         "bias": ("bias", "decoder.bias")},
}


def _checkpoint_head(folder: Path) -> dict[str, torch.Tensor] | None:
    """The MLM head tensors (our names) stored in a transformers folder, or None when it has none."""
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    wanted = {prefix + key for prefix, names in _HEAD_KEYS.items() for keys in names.values() for key in keys}
    if files:
        from safetensors import safe_open

        for file in files:  # reads only the header and the few head tensors, not the model
            with safe_open(str(file), framework="pt") as handle:
                for key in set(handle.keys()) & wanted:
                    tensors[key] = handle.get_tensor(key)
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(str(folder / "pytorch_model.bin"), map_location="cpu", weights_only=True)
        tensors = {k: v for k, v in state.items() if k in wanted}
    for prefix, names in _HEAD_KEYS.items():
        found = {ours: next((tensors[prefix + k] for k in keys if prefix + k in tensors), None)
                 for ours, keys in names.items()}
        if all(t is not None for t in found.values()):
            return found  # type: ignore[return-value]
    return None


def build_mlm_head(backbone: nn.Module, head: str = "auto", seed: int = 0) -> tuple[MLMHead, bool]:
    """The MLM head for `backbone` and whether it came from the checkpoint (``head="auto"`` and one was found)."""
    config = backbone.config
    embeddings = backbone.get_input_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MLMHead(embeddings, int(config.hidden_size), str(getattr(config, "hidden_act", "gelu")),
                         float(getattr(config, "layer_norm_eps", 1e-12)),
                         float(getattr(config, "initializer_range", 0.02)))
    module.to(embeddings.weight.device)
    pretrained = False
    source = getattr(config, "_name_or_path", "") or ""
    if head == "auto" and source and Path(source).is_dir():
        state = _checkpoint_head(Path(source))
        if state is not None:
            own = dict(module.named_parameters())
            with torch.no_grad():
                for name, tensor in state.items():
                    if own[name].shape != tensor.shape:
                        raise BadValue(f"{source}: MLM head tensor {name} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(own[name].shape)}")
                    own[name].copy_(tensor)
            pretrained = True
    return module, pretrained


# --------------------------------------------------------------------------------------------------- masking


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, word_ids: torch.Tensor | None,
                settings: MLMSettings, mask_token_id: int, random_ids: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels with -100 where no prediction is asked).

    `maskable`: bool, non-special real tokens. `word_ids`: word index of each token (-1 where not maskable),
    needed for whole-word masking. `random_ids`: the ids a random replacement draws from.
    """
    shape = input_ids.shape
    if settings.whole_word:
        if word_ids is None:
            raise BadValue("whole-word masking needs word ids (a fast tokenizer)")
        words = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
        chosen_words = torch.rand((shape[0], max(words, 1)), generator=generator) < settings.masking_rate
        chosen = chosen_words.gather(1, word_ids.clamp(min=0)) & maskable
    else:
        chosen = (torch.rand(shape, generator=generator) < settings.masking_rate) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    draw = torch.rand(shape, generator=generator)
    to_mask = chosen & (draw < settings.mask_token_prob)
    to_random = chosen & (draw >= settings.mask_token_prob) & (draw < settings.mask_token_prob
                                                               + settings.random_token_prob)
    replacements = random_ids[torch.randint(len(random_ids), shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, replacements, masked)
    return masked, labels


class _Batcher:
    """Tokenises texts (no prefixes) into padded tensors plus what masking needs."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if tokenizer.mask_token_id is None:
            raise BadValue("the tokenizer has no mask token; masked language modelling needs one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        special = set(tokenizer.all_special_ids)
        self.random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                               return_tensors="pt", return_special_tokens_mask=True)
        maskable = batch["attention_mask"].bool() & ~batch["special_tokens_mask"].bool()
        word_ids = torch.full_like(batch["input_ids"], -1)
        for row in range(len(texts)):
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and maskable[row, position]:
                    word_ids[row, position] = word
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "maskable": maskable,
                "word_ids": word_ids}


def unigram_log_prior(tokenizer: Any, texts: Sequence[str], vocab_size: int, max_length: int,
                      max_texts: int = 20000, seed: int = 0) -> torch.Tensor:
    """log p(token) over (a seeded sample of at most `max_texts` of) `texts`, add-one smoothed over the vocabulary:
    a new head's output bias, so that it starts from the corpus' token frequencies instead of a uniform guess."""
    if len(texts) > max_texts:
        texts = [texts[i] for i in np.random.default_rng(seed).choice(len(texts), max_texts, replace=False)]
    counts = np.zeros(vocab_size, dtype=np.float64)
    for start in range(0, len(texts), 1024):
        rows = tokenizer(list(texts[start:start + 1024]), truncation=True, max_length=max_length,
                         add_special_tokens=False)["input_ids"]
        ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows] or [np.zeros(0, dtype=np.int64)])
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + vocab_size))).float()


def split_heldout(texts: Sequence[str], size: int, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): a seeded sample of `size` texts is held out."""
    if size >= len(texts):
        raise AdaptConfigError(f"adapt.heldout_size={size}: the text source gave only {len(texts)} texts; keep some "
                               "for training (a smaller heldout_size or more text)")
    order = np.random.default_rng(seed).permutation(len(texts))
    held = set(order[:size].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [texts[i] for i in sorted(held)]


def _cycle(texts: Sequence[str], batch_size: int, rng: np.random.Generator) -> Iterator[list[str]]:
    """Batches of texts, reshuffled each pass; a batch never repeats a text within it."""
    while True:
        order = rng.permutation(len(texts))
        for start in range(0, len(order) - batch_size + 1, batch_size):  # equal-sized batches
            yield [texts[i] for i in order[start:start + batch_size]]


# ------------------------------------------------------------------------------------------------- training


def _loss_sum(backbone: nn.Module, head: MLMHead, batch: Mapping[str, torch.Tensor],
              device: torch.device, frozen: bool = False, unpad: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the masked tokens, and their count; only masked positions reach the head.
    `unpad`: the backbone runs on real tokens only (``model.unpad``, kernels/unpadded.py) where it can."""
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    selected = labels != -100
    with torch.no_grad() if frozen else contextlib.nullcontext():
        if unpad and unsupported_reason(backbone) is None and not bool((selected & ~attention_mask.bool()).any()):
            packed, packing = packed_forward(backbone, input_ids, attention_mask)
            states = packed[selected.reshape(-1).index_select(0, packing.flat)]  # row-major, as hidden[selected]
        else:
            states = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[selected]
    logits = head(states)
    loss = nn.functional.cross_entropy(logits.float(), labels[selected], reduction="sum")
    return loss, int(selected.sum())


def _masked(batcher: _Batcher, texts: Sequence[str], settings: MLMSettings, mask_token_id: int,
            generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = batcher(texts)
    ids, labels = mask_tokens(batch["input_ids"], batch["maskable"], batch["word_ids"], settings, mask_token_id,
                              batcher.random_ids, generator)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels}


def _heldout_loss(backbone: nn.Module, head: MLMHead, batches: Sequence[Mapping[str, torch.Tensor]],
                  device: torch.device, unpad: bool = False) -> float:
    was_training = backbone.training, head.training
    backbone.eval()
    head.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                loss, n = _loss_sum(backbone, head, batch, device, unpad=unpad)
                total, count = total + float(loss), count + n
    finally:
        backbone.train(was_training[0])
        head.train(was_training[1])
    if count == 0:
        raise AdaptConfigError("adapt.heldout_size: the held-out texts got no masked token; hold out more text "
                               "or raise adapt.masking_rate")
    return total / count


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _optimizer(backbone: nn.Module, head: MLMHead, settings: MLMSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for module in (backbone, head):
        for name, parameter in module.named_parameters():
            if not parameter.requires_grad or (module is head and name == "decoder.weight"):
                continue  # the tied decoder weight is the backbone's embedding matrix: listed once, there
            is_norm = "norm" in name.lower() or name.endswith("bias") or name == "bias"
            (no_decay if is_norm else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: the per-parameter Python loop of the default AdamW is a large share of a CPU step here.
    return torch.optim.AdamW(groups, lr=settings.lr, foreach=True)


def warm_up_head(backbone: nn.Module, head: MLMHead, batches: Iterable[Mapping[str, torch.Tensor]],
                 settings: MLMSettings, log_metrics: LogMetrics | None = None, unpad: bool = False) -> int:
    """Train only the head's own parameters (dense, LayerNorm, output bias) on masked `batches`, reading the
    backbone without gradients and without dropout; the backbone, its embedding matrix (the tied decoder) and
    its ``requires_grad`` flags are left exactly as they were. Returns the number of steps taken."""
    device = next(backbone.parameters()).device
    requires_grad = {name: p.requires_grad for name, p in backbone.named_parameters()}
    was_training = backbone.training
    optimizer = torch.optim.AdamW(head.own_parameters(), lr=settings.head_lr, weight_decay=0.0, foreach=True)
    steps, last, logged = 0, None, 0
    progress = Progress(settings.head_warmup_steps, "MLM head warm-up", "steps")
    try:
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.eval()
        head.train()
        for batch in batches:
            steps += 1
            progress.update()
            loss_sum, count = _loss_sum(backbone, head, batch, device, frozen=True, unpad=unpad)
            if not count:
                continue
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / count).backward()
            optimizer.step()
            last = loss_sum.item() / count
            progress.set_note(f"loss {last:.3f}")
            if log_metrics is not None and steps % settings.log_every == 0:
                log_metrics({"adapt/head_loss": last}, steps)
                logged = steps
        if log_metrics is not None and last is not None and logged != steps:
            log_metrics({"adapt/head_loss": last}, steps)  # the last warm-up step, always
    finally:
        progress.close()
        for name, p in backbone.named_parameters():
            p.requires_grad_(requires_grad[name])
        backbone.train(was_training)
    return steps


def train_mlm(encoder: Any, train_texts: Sequence[str], heldout_texts: Sequence[str], settings: MLMSettings,
              log_metrics: LogMetrics | None = None) -> dict[str, float]:
    """Continued MLM of ``encoder.backbone`` in place (module docstring); returns the numbers it logs."""
    started = time.perf_counter()
    log = log_metrics or (lambda metrics, step: None)
    backbone = encoder.backbone
    device = next(backbone.parameters()).device
    unpad = bool(getattr(encoder, "unpad", False))  # the encoder's model.unpad (its fallback reasons apply here too)
    tokenizer = encoder.tokenizer
    batcher = _Batcher(tokenizer, settings.max_length)
    mask_id = int(tokenizer.mask_token_id)
    head, pretrained = build_mlm_head(backbone, settings.head, settings.seed)
    if not pretrained:
        with torch.no_grad():
            head.bias.copy_(unigram_log_prior(tokenizer, train_texts, head.bias.numel(), settings.max_length,
                                              seed=settings.seed))
    rng = np.random.default_rng(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    batches = _cycle(train_texts, min(settings.batch_size, len(train_texts)), rng)

    # The held-out masks are drawn once, so "before" and "after" score exactly the same predictions.
    held_generator = torch.Generator().manual_seed(settings.heldout_mask_seed)
    heldout = [_masked(batcher, heldout_texts[i:i + settings.batch_size], settings, mask_id, held_generator)
               for i in range(0, len(heldout_texts), settings.batch_size)]

    requires_grad = {name: p.requires_grad for name, p in backbone.named_parameters()}
    modes = backbone.training
    out: dict[str, float] = {"train_texts": float(len(train_texts)), "heldout_texts": float(len(heldout_texts)),
                             "heldout_masked_tokens": float(sum(int((b["labels"] != -100).sum()) for b in heldout)),
                             "head_pretrained": float(pretrained)}
    try:
        warmup_steps = 0 if pretrained else settings.head_warmup_steps
        warm_up_head(backbone, head, (_masked(batcher, next(batches), settings, mask_id, generator)
                                      for _ in range(warmup_steps)), settings, log, unpad=unpad)
        out["head_warmup_steps"] = float(warmup_steps)

        out["heldout_loss_before"] = _heldout_loss(backbone, head, heldout, device, unpad=unpad)
        log({"adapt/heldout_loss_before": out["heldout_loss_before"],
             "adapt/heldout_perplexity_before": math.exp(out["heldout_loss_before"])}, 0)

        if settings.freeze_embeddings:
            backbone.get_input_embeddings().weight.requires_grad_(False)
        optimizer = _optimizer(backbone, head, settings)
        warmup = int(settings.warmup_ratio * settings.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, settings.steps, warmup))
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        backbone.train()
        head.train()
        losses: list[float] = []
        progress = Progress(settings.steps, "MLM adaptation", "steps")
        for step in range(1, settings.steps + 1):
            loss_sum, count = _loss_sum(backbone, head, _masked(batcher, next(batches), settings, mask_id,
                                                                generator), device, unpad=unpad)
            if count:
                loss = loss_sum / count
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                progress.set_note(f"loss {losses[-1]:.3f}")
                if step % settings.log_every == 0 or step == settings.steps:
                    log({"adapt/loss": losses[-1], "adapt/lr": scheduler.get_last_lr()[0]}, step)
            scheduler.step()
            progress.update()
        progress.close()
        out["steps"] = float(settings.steps)
        if losses:
            out["loss_first"], out["loss_last"] = losses[0], losses[-1]

        out["heldout_loss_after"] = _heldout_loss(backbone, head, heldout, device, unpad=unpad)
        out["heldout_perplexity_before"] = math.exp(out["heldout_loss_before"])
        out["heldout_perplexity_after"] = math.exp(out["heldout_loss_after"])
        out["seconds"] = time.perf_counter() - started
        before = ("heldout_loss_before", "heldout_perplexity_before")  # logged at step 0 already
        log({f"adapt/{k}": v for k, v in out.items() if k not in before}, settings.steps)
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(requires_grad[name])
        backbone.train(modes)
    return out


def load_adapt_texts(adapt_cfg: Any, eval_datasets: Sequence[str] = (),
                     settings: MLMSettings | None = None) -> list[str] | None:
    """The unlabelled texts of ``adapt.text`` (None for ``method: none``): call it before a run starts so a missing
    or empty source fails before any model or MLflow work. `settings`: what :func:`check_adapt_config` returned,
    when the caller checked the config already."""
    from hybrid_retrieval.data.text import load_texts

    settings = settings or check_adapt_config(adapt_cfg, eval_datasets)
    if settings is None:
        return None
    return load_texts(_container(adapt_cfg)["text"], seed=settings.seed, eval_datasets=eval_datasets)


def adapt_tags(adapt_cfg: Any) -> dict[str, str]:
    """MLflow tags naming the adaptation and its text, and whether that text is an evaluation corpus."""
    from hybrid_retrieval.data.text import uses_eval_corpus

    cfg = _container(adapt_cfg)
    if cfg.get("method") != "mlm":
        return {"adapt_method": str(cfg.get("method"))}
    text = cfg.get("text") or {}
    return {"adapt_method": "mlm", "adapt_source": str(text.get("source")),
            "adapt_text": json.dumps({k: v for k, v in text.items() if v is not None}, ensure_ascii=False),
            "adapt_uses_eval_corpus": str(uses_eval_corpus(text)).lower()}


def adapt_encoder(encoder: Any, adapt_cfg: Any, log_metrics: LogMetrics | None = None,
                  texts: Sequence[str] | None = None, eval_datasets: Sequence[str] = (),
                  settings: MLMSettings | None = None) -> dict[str, float]:
    """Adapt ``encoder.backbone`` in place as ``adapt_cfg`` (``conf/adapt/*.yaml``) says; {} for ``method: none``.

    `log_metrics(metrics, step)` receives ``adapt/...`` metrics (e.g. ``TrackedRun.log_metrics``). `texts`: the
    unlabelled texts, if already loaded (else read from ``adapt_cfg.text``). `eval_datasets`: see
    :func:`check_adapt_config`. `settings`: what :func:`check_adapt_config` returned, when the caller checked the
    config already. Returns the held-out loss and perplexity before and after, and run facts.
    """
    settings = settings or check_adapt_config(adapt_cfg, eval_datasets)
    if settings is None:
        return {}
    if texts is None:
        texts = load_adapt_texts(adapt_cfg, eval_datasets, settings)
    train_texts, heldout_texts = split_heldout(list(texts), settings.heldout_size, settings.seed)
    return train_mlm(encoder, train_texts, heldout_texts, settings, log_metrics)
