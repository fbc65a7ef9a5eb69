"""model.unpad: the packed forward (kernels/unpadded.py) gives the padded forward's embeddings and gradients."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.kernels import unpadded
from hybrid_retrieval.kernels.unpadded import (
    _attend,
    pack,
    packed_forward,
    position_ids,
    unsupported_reason,
)
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.models.config import check_model
from hybrid_retrieval.models.encoder import Encoder, load_encoder
from hybrid_retrieval.schemas import load_node

CONF_MODELS = Path(__file__).resolve().parents[1] / "conf" / "model"
QUERIES = ["short", "what is the capital city of the country that hosted the games in the year before",
           "a middle-sized question about rivers", "zwei Wörter"]
PASSAGES = ["The capital is a large city on the river, founded long ago by settlers from the coast and the hills.",
            "Rivers flow.", "Berlin ist die Hauptstadt.", "x"]


def _variant(encoder: Encoder, unpad: bool) -> Encoder:
    twin = copy.copy(encoder)  # a shallow copy shares backbone and weights: only the switch differs
    twin.unpad = unpad
    twin._fallbacks_logged = set()
    return twin


def _ragged_batch(encoder: Encoder, texts: list[str], kind: str = "query") -> dict[str, torch.Tensor]:
    """The tokenised texts plus two edge rows: a single real token, and a row with no padding at all."""
    batch = encoder.tokenize(texts, kind)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    width = ids.shape[1]
    one = torch.full((1, width), encoder.pad_token_id)
    one[0, 0] = ids[0, 0]
    full = torch.randint(5, 1000, (1, width), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, one, full])
    mask = torch.cat([mask, (one != encoder.pad_token_id).long(), torch.ones(1, width, dtype=torch.long)])
    assert mask.sum(1).min() == 1 and mask.sum(1).max() == width
    return {"input_ids": ids, "attention_mask": mask}


def _no_dropout(encoder: Encoder) -> Encoder:
    model = copy.deepcopy(encoder).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def test_default_is_on_in_every_model_config() -> None:
    for path in sorted(CONF_MODELS.glob("*.yaml")):
        assert OmegaConf.load(path).unpad is True, path.name


@pytest.fixture(params=["in place", "cost model", "one group per length"])
def attention_grouping(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Attention in place on runs of equal length (the default for few runs), and through the padded buffer with
    the default grouping of rows and with one that splits them as far as it can (no call overhead)."""
    if request.param != "in place":
        monkeypatch.setattr(unpadded, "MAX_EXACT_GROUPS", 0)
    if request.param == "one group per length":
        monkeypatch.setattr(unpadded, "GROUP_OVERHEAD", 0)
    return request.param


@pytest.mark.parametrize("fixture", ["tiny_encoder", "me5_small"])
def test_fp32_embeddings_equal_padded(fixture: str, request: pytest.FixtureRequest, one_torch_thread,
                                      attention_grouping: str) -> None:
    encoder = request.getfixturevalue(fixture)
    assert encoder.unpad and encoder.unpad_fallback() is None
    batch = _ragged_batch(encoder, QUERIES)
    with torch.no_grad():
        packed = _variant(encoder, True)(**batch)
        padded = _variant(encoder, False)(**batch)
    assert packed.dtype == torch.float32 and packed.shape == padded.shape
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_bf16_autocast_embeddings_close_to_padded(tiny_encoder: Encoder, one_torch_thread) -> None:
    batch = _ragged_batch(tiny_encoder, PASSAGES, "passage")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = _variant(tiny_encoder, True)(**batch)
        padded = _variant(tiny_encoder, False)(**batch)
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, padded, atol=2e-2, rtol=0)


@pytest.mark.parametrize("exact_groups", [16, 0])
def test_encode_equal_padded_with_onednn_linears(me5_small: Encoder, one_torch_thread, exact_groups: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """encode() in fp32 on CPU runs the oneDNN linears (GELU fused into intermediate.dense, Q/K/V joined) on
    packed tokens, attending in place (sorted batches) or through the padded buffer."""
    monkeypatch.setattr(unpadded, "MAX_EXACT_GROUPS", exact_groups)
    texts = QUERIES + PASSAGES + ["zwei Wörter", "Rivers flow."]  # equal lengths: runs of more than one row
    packed = _variant(me5_small, True).encode(texts, "passage", batch_size=5)
    padded = _variant(me5_small, False).encode(texts, "passage", batch_size=5)
    assert abs(packed - padded).max() < 1e-5


def test_pack_attends_in_place_on_runs_of_equal_length() -> None:
    lengths = [9, 9, 9, 5, 5, 2]
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    packing = pack(mask)
    assert packing.in_place and packing.size == packing.total == sum(lengths)
    assert torch.equal(packing.slots, torch.arange(sum(lengths)))
    assert [(g.count, g.width, g.offset) for g in packing.groups] == [(3, 9, 0), (2, 5, 27), (1, 2, 37)]
    assert all(g.key_mask is None for g in packing.groups)
    # Too many runs, an empty row, or a device where each group is a kernel launch: the padded buffer.
    assert not pack(mask, max_exact_groups=2).in_place
    assert not pack(mask, max_exact_groups=0).in_place
    empty = mask.clone()
    empty[-1] = False
    assert not pack(empty).in_place
    # Holes inside a row still pack in place: a row's real tokens keep their order.
    holes = mask.clone()
    holes[0, 3] = False
    holes[1, 3] = False
    holes[2, 3] = False
    assert pack(holes).in_place and [g.width for g in pack(holes).groups] == [8, 5, 2]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_contrastive_gradients_equal_padded(tiny_encoder: Encoder, checkpointing: bool,
                                           attention_grouping: str) -> None:
    loss_fn = InfoNCELoss(temperature=0.05)
    queries, passages = _ragged_batch(tiny_encoder, QUERIES), _ragged_batch(tiny_encoder, PASSAGES, "passage")
    grads = {}
    for unpad in (False, True):
        model = _no_dropout(tiny_encoder)
        model.unpad = unpad
        if checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = loss_fn(model(**queries), model(**passages), None)
        loss.backward()
        grads[unpad] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    names = {name for name, _ in tiny_encoder.named_parameters()}
    assert set(grads[True]) == set(grads[False]) == names
    for name in sorted(names):
        ref, got = grads[False][name], grads[True][name]
        assert torch.linalg.vector_norm(got - ref) <= 1e-5 * torch.linalg.vector_norm(ref) + 1e-9, name


def test_attention_with_dropout_path_equals_sdpa() -> None:
    """On CPU with dropout the attention product runs outside SDPA (for the dropout mask): with a mask that keeps
    everything it equals SDPA's result, bf16 inputs included."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8) for _ in range(3))
    key_mask = (torch.arange(7) < torch.tensor([7, 3, 1]).unsqueeze(1))[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=0.3)
    torch.testing.assert_close(_attend(q, k, v, key_mask, 1e-12, 0.3), expected, atol=1e-6, rtol=0)
    unmasked = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(_attend(q, k, v, None, 1e-12, 0.3), unmasked, atol=1e-6, rtol=0)
    got = _attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_mask, 1e-12, 0.3)
    assert got.dtype is torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=0)


def test_training_forward_replays_its_dropout(tiny_encoder: Encoder) -> None:
    model = copy.deepcopy(tiny_encoder).train()
    batch = _ragged_batch(model, PASSAGES, "passage")
    torch.manual_seed(5)
    first = model(**batch)
    torch.manual_seed(5)
    again = model(**batch)
    torch.manual_seed(6)
    other = model(**batch)
    assert torch.equal(first, again) and not torch.allclose(first, other)


def _tiny_xlmr(me5_small_dir: Path) -> Encoder:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from hybrid_retrieval.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(me5_small_dir))
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    backbone = XLMRobertaModel(config, add_pooling_layer=False).eval()
    return Encoder(backbone, tokenizer, name="tiny_xlmr", max_query_length=64, max_passage_length=64)


def test_xlmr_positions_start_after_padding_idx(me5_small_dir: Path) -> None:
    encoder = _tiny_xlmr(me5_small_dir)
    assert encoder.unpad_fallback() is None
    batch = encoder.tokenize(QUERIES, "query")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packing = pack(mask)
    positions = position_ids(encoder.backbone, ids).reshape(-1)[packing.flat]
    pad = encoder.backbone.config.pad_token_id
    assert pad == 1
    # Each row's real tokens sit at padding_idx + 1, padding_idx + 2, ... (fairseq's make_positions).
    expected = torch.cat([torch.arange(n) + pad + 1 for n in mask.sum(1).tolist()])
    assert torch.equal(positions, expected)
    with torch.no_grad():
        hidden, _ = packed_forward(encoder.backbone, ids, mask)
        reference = encoder.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
        embedded = _variant(encoder, True)(**batch)
        padded = _variant(encoder, False)(**batch)
    torch.testing.assert_close(hidden, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(embedded, padded, atol=1e-5, rtol=0)


def test_cls_pooling_equal_padded(me5_small_dir: Path) -> None:
    encoder = _tiny_xlmr(me5_small_dir)
    encoder.pooling = "cls"
    batch = _ragged_batch(encoder, PASSAGES, "passage")
    with torch.no_grad():
        torch.testing.assert_close(_variant(encoder, True)(**batch), _variant(encoder, False)(**batch),
                                   atol=1e-5, rtol=0)


def _distilbert(me5_small_dir: Path) -> Encoder:
    from transformers import DistilBertConfig, DistilBertModel

    from hybrid_retrieval.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(me5_small_dir))
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Encoder(DistilBertModel(config).eval(), tokenizer, name="tiny_distilbert", max_passage_length=64)


def _relative_bert(tiny_encoder: Encoder, me5_small_dir: Path) -> Encoder:
    model = copy.deepcopy(tiny_encoder)
    model.backbone.config.position_embedding_type = "relative_key"
    return model


@pytest.mark.parametrize("build,named", [(_distilbert, "distilbert"), (_relative_bert, "relative_key")])
def test_unsupported_backbone_falls_back_with_one_logged_reason(
    build, named: str, tiny_encoder: Encoder, me5_small_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    encoder = build(me5_small_dir) if build is _distilbert else build(tiny_encoder, me5_small_dir)
    reason = unsupported_reason(encoder.backbone)
    assert reason is not None and named in reason
    batch = encoder.tokenize(QUERIES, "query")
    with caplog.at_level(logging.WARNING, logger="hybrid_retrieval.models.encoder"), torch.no_grad():
        first = encoder(**batch)
        encoder(**batch)  # a second batch logs nothing more
        padded = _variant(encoder, False)(**batch)
    logged = [r.getMessage() for r in caplog.records if "model.unpad" in r.getMessage()]
    assert len(logged) == 1 and reason in logged[0]
    assert torch.equal(first, padded)


def test_unpad_must_be_a_bool() -> None:
    # Composed, the schema turns "yes" into true; a model config from elsewhere (a checkpoint, Python) is checked.
    model = OmegaConf.create(OmegaConf.to_container(load_node(CONF_MODELS / "tiny.yaml")))
    model.unpad = "yes"
    with pytest.raises(ConfigError, match=r"model\.unpad='yes'"):
        check_model(model)
    with pytest.raises(ValueError, match=r"model\.unpad='yes'"):
        load_encoder(**{k: v for k, v in OmegaConf.to_container(model).items() if not k.startswith("_")})


def test_mlm_loss_on_packed_tokens_equals_padded(tiny_encoder: Encoder) -> None:
    """MLM adaptation reads only the masked positions' states: the same ones, in the same order, when packed."""
    from hybrid_retrieval.adaptation.mlm import _loss_sum

    batch = tiny_encoder.tokenize(PASSAGES, "passage")
    mask = batch["attention_mask"].bool()
    labels = torch.full_like(batch["input_ids"], -100)
    chosen = mask & (torch.arange(mask.shape[1]) % 3 == 1)
    labels[chosen] = torch.arange(int(chosen.sum())) % 50
    torch.manual_seed(0)
    head = nn.Linear(tiny_encoder.backbone.config.hidden_size, 50)
    inputs = {**batch, "labels": labels}
    backbone = copy.deepcopy(tiny_encoder.backbone).eval()
    packed, n_packed = _loss_sum(backbone, head, inputs, torch.device("cpu"), unpad=True)
    padded, n_padded = _loss_sum(backbone, head, inputs, torch.device("cpu"), unpad=False)
    assert n_packed == n_padded == int(chosen.sum()) > 3
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-6)
