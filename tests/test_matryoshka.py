"""Matryoshka loss (losses/matryoshka.py) and truncated encoding (model.truncate_dim)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybrid_retrieval.losses.cached import cached_backward
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.losses.matryoshka import MatryoshkaLoss, check_matryoshka, truncate


def embeddings(batch: int = 6, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_one_dimension_equal_to_the_full_size_is_plain_info_nce_exactly(learnable: bool, symmetric: bool) -> None:
    q, p, h = embeddings()
    base = InfoNCELoss(temperature=0.07, learnable_temperature=learnable, symmetric=symmetric)
    wrapped = MatryoshkaLoss(base, [16])
    assert torch.equal(wrapped(q, p), base(q, p))
    assert torch.equal(wrapped(q, p, h), base(q, p, h))
    assert torch.equal(wrapped(q, p, h.reshape(6, 1, 16)), base(q, p, h))
    if learnable:  # the temperature is the base loss's own parameter, shared by every size
        assert [n for n, _ in wrapped.named_parameters()] == ["loss.log_temperature"]
        assert wrapped.temperature is not None and float(wrapped.temperature.detach()) == pytest.approx(0.07)


def test_each_size_scores_the_renormalised_prefix_and_the_terms_are_weighted() -> None:
    q, p, h = (t * 3.0 for t in embeddings())  # not unit length: normalisation must happen inside
    base = InfoNCELoss(temperature=0.05)
    loss = MatryoshkaLoss(base, [16, 8, 4], [1.0, 0.5, 2.0])

    def prefix(x: torch.Tensor, d: int) -> torch.Tensor:
        part = x[:, :d]
        return part / part.norm(dim=-1, keepdim=True)

    expected = base(q, p, h) + 0.5 * base(prefix(q, 8), prefix(p, 8), prefix(h, 8)) + \
        2.0 * base(prefix(q, 4), prefix(p, 4), prefix(h, 4))
    torch.testing.assert_close(loss(q, p, h), expected, rtol=1e-12, atol=1e-12)
    # The truncated prefix is re-normalised (dot-product similarity sees unit vectors); the full size is untouched.
    assert torch.allclose(truncate(q, 4).norm(dim=-1), torch.ones(6, dtype=torch.float64))
    assert truncate(q, 16) is q
    dot = InfoNCELoss(temperature=0.5, similarity="dot")
    torch.testing.assert_close(MatryoshkaLoss(dot, [4])(q, p), dot(prefix(q, 4), prefix(p, 4)))
    assert abs(float(MatryoshkaLoss(dot, [4])(q, p)) - float(dot(q[:, :4], p[:, :4]))) > 1e-3


def test_gradients_with_gradient_caching_equal_the_plain_loss(tiny_encoder: Any, data_root: Path) -> None:
    from hybrid_retrieval.data.lareqa_pairs import from_lareqa

    pairs = from_lareqa("xquad_r", data_root, languages=["en"], max_groups=10)
    encoder = copy.deepcopy(tiny_encoder).eval()
    batch = {"query": encoder.tokenize(pairs.queries[:8], "query"),
             "passage": encoder.tokenize(pairs.passages[:8], "passage"),
             "hard_negative": encoder.tokenize(pairs.passages[8:10], "passage")}
    loss = MatryoshkaLoss(InfoNCELoss(temperature=0.05, learnable_temperature=True), [64, 32, 8], [1, 1, 0.5])

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
        out.update({n: p.grad.clone() for n, p in loss.named_parameters() if p.grad is not None})
        encoder.zero_grad()
        loss.zero_grad()
        return out

    plain_value = loss(*(encoder(**batch[k]) for k in ("query", "passage", "hard_negative")))
    plain_value.backward()
    plain = grads()
    cached_value = cached_backward(encoder, batch, lambda e: loss(e["query"], e["passage"], e["hard_negative"]), 3)
    cached = grads()
    assert float(cached_value) == pytest.approx(float(plain_value), rel=1e-6)
    assert plain.keys() == cached.keys() and "loss.log_temperature" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_entry_builds_the_wrapper_and_bad_values_name_the_option() -> None:

    from hydra import compose, initialize_config_dir

    from hybrid_retrieval.training.train import build_losses

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        plain, wrapped = (compose(config_name="config", overrides=overrides)
                          for overrides in ([], ["matryoshka.dims=[64,32]"]))
    assert isinstance(build_losses(plain)[0], InfoNCELoss)  # null = off: the plain loss itself
    built = build_losses(wrapped)[0]
    assert isinstance(built, MatryoshkaLoss) and built.dims == [64, 32] and built.weights == [1.0, 1.0]
    assert isinstance(built.loss, InfoNCELoss) and "matryoshka" not in wrapped.loss  # the loss node is the loss alone
    for dims, weights, message in (([0, 8], None, "matryoshka.dims"), ([8, 8], None, "twice"),
                                   ([8, 4], [1.0], "matryoshka.weights"), (None, [1.0], "matryoshka.dims"),
                                   ([8], [0.0], "matryoshka.weights")):
        with pytest.raises(ValueError, match=message):
            check_matryoshka(dims, weights)
    with pytest.raises(ValueError, match=r"matryoshka.dims=\[768, 64\]: 768 exceeds the model's 384"):
        check_matryoshka([768, 64], None, 384)


def test_truncate_dim_encodes_the_renormalised_prefix(tiny_encoder: Any) -> None:
    texts = ["how tall is the eiffel tower?", "wer schrieb faust?", "el agua hierve a 100 grados"]
    full = tiny_encoder.encode(texts, "passage")
    truncated = copy.deepcopy(tiny_encoder)
    truncated.truncate_dim = 16
    assert truncated.output_dim == 16 and truncated.embedding_dim == 64
    short = truncated.encode(texts, "passage")
    assert short.shape == (3, 16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, rtol=1e-6)


def test_a_truncate_dim_beyond_the_model_is_refused_by_the_config_check() -> None:
    from hydra import compose, initialize_config_dir

    from hybrid_retrieval.config_error import ConfigError
    from hybrid_retrieval.evaluate import check_evaluate_config
    from hybrid_retrieval.training.config import check_train_config

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        evaluate = compose(config_name="evaluate", overrides=["model=tiny", "model.truncate_dim=65"])
        train = compose(config_name="config", overrides=["model=me5_small", "matryoshka.dims=[512,64]"])
        fine = compose(config_name="evaluate", overrides=["model=me5_small", "model.truncate_dim=384"])
    with pytest.raises(ConfigError, match=r"model.truncate_dim=65 exceeds the model's 64 embedding dimensions"):
        check_evaluate_config(evaluate)
    with pytest.raises(ConfigError, match=r"matryoshka.dims=\[512, 64\]: 512 exceeds the model's 384"):
        check_train_config(train)
    check_evaluate_config(fine)
