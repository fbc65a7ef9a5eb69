"""The translation stage, offline: a tiny randomly initialised NLLB-style model (M2M100 architecture, an NLLB
tokenizer trained here on real SQuAD-es/it text) checks the mechanics, not the quality: length batching and
input order, cache hits and resuming after a crash or a SIGKILL, provenance, the output schema, and the errors
raised before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hybrid_retrieval.data.jsonl_pairs import from_jsonl
from hybrid_retrieval.data.sentences import split_sentences
from hybrid_retrieval.data.squad import load_squad
from hybrid_retrieval.translation.languages import LanguageError, family_codes, model_language_code

REPO_ROOT = Path(__file__).resolve().parents[1]
ES = "squad-es/dev-v1.1-es_small.json"
IT = "squad-it/SQuAD_it-test.json.gz"


@pytest.fixture(scope="module")
def squad_es(data_root: Path) -> Any:
    return load_squad({"es": data_root / ES}, drop_xquad=False)["es"]


@pytest.fixture(scope="module")
def tiny_nllb(tmp_path_factory: pytest.TempPathFactory, squad_es: Any) -> Path:
    """A random 1-layer M2M100 model with an NLLB tokenizer (BPE trained on SQuAD-es sentences), saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    folder = tmp_path_factory.mktemp("tiny_nllb")
    text = [s for p in squad_es.paragraphs[:150] for s in p.sentences]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                      special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = NllbTokenizer(vocab=bpe.get_vocab(), merges=merges)
    assert tokenizer.convert_tokens_to_ids("spa_Latn") != tokenizer.unk_token_id  # the 202 codes are in
    tokenizer.save_pretrained(folder)
    config = M2M100Config(vocab_size=len(tokenizer), d_model=64, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=256, pad_token_id=1, bos_token_id=0,
                          eos_token_id=2, decoder_start_token_id=2, init_std=1.0, dropout=0.0)
    torch.manual_seed(0)  # a wide init: outputs differ from input to input, so order mistakes show
    never_empty(M2M100ForConditionalGeneration(config), tokenizer).save_pretrained(folder)
    return folder


def never_empty(model: Any, tokenizer: Any) -> Any:
    """Random models often stop at once or emit only special tokens: ban every token that decodes to nothing
    (the forced language token is applied after the ban) and the end before 2 real tokens."""
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i], skip_special_tokens=True).strip()]
    model.generation_config.bad_words_ids = [[i] for i in blank if i != tokenizer.eos_token_id]
    model.generation_config.min_new_tokens = 3
    return model


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory: pytest.TempPathFactory, squad_es: Any) -> Path:
    """Two random Marian models, es-it and es-sw (OPUS-MT has one per pair), sharing a SentencePiece vocabulary."""
    import io

    import sentencepiece
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("tiny_marian")
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter([s for p in squad_es.paragraphs[:100]
                                                                     for s in p.sentences]),
                                             model_writer=proto, vocab_size=300, minloglevel=2)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    vocab["<pad>"] = len(vocab)
    for seed, target in enumerate(("it", "sw")):
        folder = root / f"es-{target}"
        folder.mkdir()
        for name in ("source.spm", "target.spm"):
            (folder / name).write_bytes(proto.getvalue())
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        tokenizer = MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))
        tokenizer.save_pretrained(folder)
        config = MarianConfig(vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=vocab["<pad>"],
                              decoder_start_token_id=vocab["<pad>"], eos_token_id=vocab["</s>"], init_std=1.0,
                              dropout=0.0)
        torch.manual_seed(seed)
        never_empty(MarianMTModel(config), tokenizer).save_pretrained(folder)
    return root


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("translate", overrides=overrides)


def tiny_overrides(model: Path, tmp_path: Path, **options: Any) -> list[str]:
    settings = {"model_path": model, "cache": tmp_path / "cache.jsonl", "output": tmp_path / "out" / "pairs.jsonl",
                "num_beams": 1, "max_new_tokens": 6, "batch_size": 4, "progress_every_s": 1000, **options}
    return ["translate_model.checkpoint=null", "translate_model.name=tiny",
            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *(f"translate.{k}={value(v)}" for k, v in settings.items())]


def value(v: Any) -> str:
    """An override's value: braces ({source}-{target}) need Hydra's quotes."""
    return "null" if v is None else f"'{v}'" if "{" in str(v) else str(v)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def source_rows(squad_es: Any, n: int) -> list[dict]:
    """n real Spanish rows (two-sentence passages), plus a repeated question and an Italian row of group 0."""
    rows = []
    for q in squad_es.questions:
        para = squad_es.paragraphs[q.paragraph]
        if q.sentence + 1 < len(para.sentences):
            rows.append({"group": q.id, "language": "es", "query": q.text,
                         "passage": f"{para.sentences[q.sentence]} {para.sentences[q.sentence + 1]}"})
        if len(rows) == n:
            break
    rows[3]["query"] = rows[2]["query"]  # identical texts are translated once
    rows[1]["hard_negative"] = rows[5]["passage"]
    rows.append({"group": rows[0]["group"], "language": "it", "query": "Chi ha vinto?", "passage": "Hanno vinto."})
    return rows


def run_stage(overrides: list[str], folder: Path) -> Any:
    """The library half of the driver (no MLflow run): prepare (all checks), then run; returns the job."""
    from hybrid_retrieval.translation.job import prepare_job, run_job
    from hybrid_retrieval.translation.stage import TranslationStopped

    job = prepare_job(compose(overrides), folder)
    try:
        run_job(job)
    except TranslationStopped:
        pass
    return job


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Language codes and presets


def test_language_codes_and_presets() -> None:
    cfg = compose(["translate_model=nllb_600m"]).translate_model
    assert model_language_code("nllb", "es", cfg.language_codes, "x") == "spa_Latn"
    assert model_language_code("nllb", "swh_Latn", cfg.language_codes, "x") == "swh_Latn"  # a model code as is
    with pytest.raises(LanguageError) as error:
        model_language_code("nllb", "xx", cfg.language_codes, "translate.target_languages", "nllb_600m")
    assert "translate.target_languages='xx'" in str(error.value) and "es (spa_Latn)" in str(error.value)
    assert model_language_code("m2m100", "sw", {}, "x") == "sw"
    with pytest.raises(LanguageError, match="ISO 639-1 codes such as es"):
        model_language_code("m2m100", "spa_Latn", {}, "x")
    # Every preset's mapping names codes its family knows (a typo in a yaml file fails here).
    for preset in ("nllb_600m", "nllb_1.3b", "m2m100_418m", "marian"):
        model = compose([f"translate_model={preset}"]).translate_model
        assert model.name == preset and model.checkpoint
        for language in model.language_codes or {}:
            model_language_code(model.family, language, model.language_codes, preset)
    assert compose(["translate_model=nllb_1.3b"]).translate_model.language_codes.it == "ita_Latn"
    assert len(family_codes("nllb")) == 202


# ---------------------------------------------------------------------------------------------------------------
# Batching


def test_length_batches_cover_every_text_once_longest_first() -> None:
    from hybrid_retrieval.translation.translator import plan_length_batches

    lengths = [5, 40, 7, 7, 120, 3, 40, 9, 11, 2, 7]
    plan = plan_length_batches(lengths, batch_size=3, max_batch_tokens=100)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    flat = [i for batch in plan for i in batch]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert [i for i in flat if lengths[i] == 7] == [2, 3, 10]  # ties keep input order
    for batch in plan:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 100
    assert plan == plan_length_batches(lengths, 3, 100)


def test_translator_keeps_input_order_and_matches_one_by_one(tiny_nllb: Path, squad_es: Any) -> None:
    from hybrid_retrieval.translation.translator import GenerationSettings, Seq2SeqTranslator, plan_length_batches

    texts = [q.text for q in squad_es.questions[:10]] + ["Sí.", squad_es.paragraphs[0].sentences[0]]
    translator = Seq2SeqTranslator(tiny_nllb, "nllb", "spa_Latn", GenerationSettings(1, 6, 64))
    alone = [translator.translate([text], "ita_Latn")[0] for text in texts]
    assert len(set(alone)) >= 4  # the model's outputs depend on the input
    lengths = translator.token_lengths(texts)
    plan = plan_length_batches(lengths, batch_size=4, max_batch_tokens=None)
    batched = [""] * len(texts)
    for batch in plan:
        for i, out in zip(batch, translator.translate([texts[i] for i in batch], "ita_Latn")):
            batched[i] = out
    # Padding inside a batch (to its longest text) changes nothing: same outputs, each at its input position.
    assert batched == alone
    assert translator.translate(texts, "ita_Latn") == alone
    assert translator.translate(texts[:3], "swh_Latn") != alone[:3]  # the target token is forced


# ---------------------------------------------------------------------------------------------------------------
# The stage end to end (in process): schema, provenance, cache hits


@pytest.mark.slow
def test_translate_jsonl_writes_training_rows_with_provenance(tiny_nllb: Path, squad_es: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from hybrid_retrieval.translate import translate

    monkeypatch.chdir(tmp_path)  # the run folder of an in-process run is the working directory
    rows = source_rows(squad_es, 12)
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = compose(tiny_overrides(tiny_nllb, tmp_path, input=source, source_language="es",
                                 target_languages="[it,sw]"))
    job = translate(cfg)
    output = tmp_path / "out" / "pairs.jsonl"
    out = read_lines(output)
    provenance = read_lines(tmp_path / "out" / "pairs.provenance.jsonl")
    assert len(out) == len(provenance) == 13 + 11 + 12 - job.stats.empty_dropped  # group 0 has it already

    # Input rows first, unchanged; then each target's rows in input order, sharing their source's group.
    assert out[:13] == rows
    translated = out[13:]
    assert [r["language"] for r in translated] == ["it"] * 11 + ["sw"] * 12
    assert [r["group"] for r in translated] == [r["group"] for r in rows[1:12]] + [r["group"] for r in rows[:12]]
    assert translated[0]["hard_negative"] and "hard_negative" not in translated[1]  # row 1 carried one
    for row, record in zip(out, provenance):
        assert record["source_group"] == row["group"]
    for record in provenance[13:]:
        assert record["translated"] and record["model"] == str(tiny_nllb.resolve())
        assert record["source_language"] == "es" and rows[record["source_row"]]["group"] == record["source_group"]
        assert record["source_line"] == record["source_row"] + 1
    assert not any(p["translated"] for p in provenance[:13])

    # Training reads it: groups span es, it and sw, so sampler=hybrid gets cross-lingual pairs.
    pairs = from_jsonl(output)
    assert pairs.language_names == ["es", "it", "sw"] and pairs.n_groups == 12
    assert pairs.summary()["groups_by_language_count"] == {3: 12}

    # Each distinct text was translated once per target: the cache has one line per (target, text).
    units = {"it": set(), "sw": set()}
    for i, row in enumerate(rows[:12]):
        texts = {row["query"], *split_sentences(row["passage"], "es"),
                 *split_sentences(row.get("hard_negative") or "", "es")}
        units["sw"] |= texts
        if i:
            units["it"] |= texts
    cache = read_lines(tmp_path / "cache.jsonl")
    assert len(cache) == job.stats.translated == len(units["it"]) + len(units["sw"])
    assert len({(c["target_language"], c["sha256"]) for c in cache}) == len(cache)
    assert job.stats.model_batches == sum(p["model_batches"] for p in job.stats.per_target.values())

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["output"] == str(output)
    assert run.data.metrics["translate/translated"] == len(cache)
    assert json.loads((tmp_path / "translate_stats.json").read_text())["translated"] == len(cache)

    # A second run is answered from the cache alone, to the same bytes.
    before = output.read_bytes()
    again = translate(cfg)
    assert again.stats.translated == 0 and again.stats.cache_hits == len(cache)
    assert output.read_bytes() == before and len(read_lines(tmp_path / "cache.jsonl")) == len(cache)


@pytest.mark.slow
def test_resume_after_a_crash_translates_only_what_is_missing(tiny_nllb: Path, squad_es: Any, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", source_rows(squad_es, 14))
    common = dict(input=source, source_language="es", target_languages="[it]", batch_size=3)
    whole = run_stage(tiny_overrides(tiny_nllb, tmp_path / "a", **common), tmp_path / "a")
    assert whole.stats.model_batches > 4

    crashed = tmp_path / "b"
    stopped = run_stage(tiny_overrides(tiny_nllb, crashed, **common, max_batches=3), crashed)
    cached = read_lines(crashed / "cache.jsonl")
    assert stopped.stats.model_batches == 3 and len(cached) == stopped.stats.translated
    assert not (crashed / "out" / "pairs.jsonl").exists()  # a stopped run writes no output

    resumed = run_stage(tiny_overrides(tiny_nllb, crashed, **common), crashed)
    assert resumed.stats.translated == whole.stats.translated - len(cached)
    assert resumed.stats.cache_hits == len(cached)
    assert resumed.stats.model_batches == whole.stats.model_batches - 3  # the same batches, minus the done ones
    assert (crashed / "out" / "pairs.jsonl").read_bytes() == (tmp_path / "a" / "out" / "pairs.jsonl").read_bytes()


@pytest.mark.slow
def test_translate_squad_input(tiny_nllb: Path, data_root: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_RETRIEVAL_DATA", str(data_root))
    job = run_stage(tiny_overrides(tiny_nllb, tmp_path, input=data_root / IT, source_language="it",
                                   target_languages="[es]", max_rows=6,
                                   **{"squad.passage_text": "sentence_paragraph"}), tmp_path)
    out = read_lines(tmp_path / "out" / "pairs.jsonl")
    italian = load_squad({"it": data_root / IT})["it"]
    first = italian.questions[:6]
    assert [r["group"] for r in out] == [q.id for q in first] * 2
    assert [r["language"] for r in out] == ["it"] * 6 + ["es"] * 6
    para = italian.paragraphs[first[0].paragraph]
    assert out[0]["passage"] == f"{para.sentences[first[0].sentence]} {para.context}"
    # A sentence_paragraph passage is translated sentence by sentence, each distinct sentence once.
    pieces = [r["query"] for r in out[:6]] + [s for r in out[:6] for s in split_sentences(r["passage"], "it")]
    assert job.stats.per_target["es"]["units"] == len(set(pieces)) < len(pieces)
    pairs = from_jsonl(tmp_path / "out" / "pairs.jsonl")
    assert pairs.summary()["groups_by_language_count"] == {2: 6}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
def test_marian_loads_one_model_per_language_pair(tiny_marian: Path, squad_es: Any, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", source_rows(squad_es, 6))
    overrides = tiny_overrides(tiny_marian / "{source}-{target}", tmp_path, input=source, source_language="es",
                               target_languages="[it,sw]")
    job = run_stage(["translate_model=marian", *overrides], tmp_path)
    assert job.models == {"it": str((tiny_marian / "es-it").resolve()), "sw": str((tiny_marian / "es-sw").resolve())}
    out = read_lines(tmp_path / "out" / "pairs.jsonl")
    provenance = read_lines(tmp_path / "out" / "pairs.provenance.jsonl")
    assert [r["language"] for r in out] == ["es"] * 6 + ["it"] + ["it"] * 5 + ["sw"] * 6
    assert {p["model"] for p, r in zip(provenance, out) if r["language"] == "sw"} == {job.models["sw"]}
    assert {c["model"] for c in read_lines(tmp_path / "cache.jsonl")} == set(job.models.values())
    # Different models, different translations of the same texts.
    assert [r["query"] for r in out[12:]][1:] != [r["query"] for r in out[7:12]]


# ---------------------------------------------------------------------------------------------------------------
# Errors, before any model is loaded and before the MLflow run


def _bad_inputs(tmp_path: Path, data_root: Path) -> dict[str, tuple[list[str], str]]:
    good = write_jsonl(tmp_path / "good.jsonl", [{"group": "g", "language": "es", "query": "¿Qué?", "passage": "Eso."}])
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(good.read_text() + '{"group": "h", "language": "es", "query": ""}\n', encoding="utf-8")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    squad_named_jsonl = tmp_path / "squad.jsonl"
    squad_named_jsonl.write_text(json.dumps({"version": "1.1", "data": []}) + "\n")
    jsonl_named_json = tmp_path / "rows.json"
    jsonl_named_json.write_text(good.read_text() * 2)
    base = {"source_language": "es", "target_languages": "[it]"}
    return {
        "missing": ({**base, "input": tmp_path / "nope.jsonl"}, "translate.input=.*nope.jsonl.*no such file"),
        "empty": ({**base, "input": empty}, r"empty\.jsonl.* is empty"),
        "bad line": ({**base, "input": bad_line}, r"bad\.jsonl:2: field 'query'"),
        "squad as jsonl": ({**base, "input": squad_named_jsonl}, r"squad\.jsonl:1: unknown field\(s\) \['data'"),
        "jsonl as json": ({**base, "input": jsonl_named_json}, r"rows\.json: not valid JSON"),
        "other language": ({**base, "input": good, "source_language": "de"},
                           r"no rows in translate.source_language='de'.*\['es'\]"),
        "unknown target": ({**base, "input": good, "target_languages": "[it,xx]"},
                           r"translate.target_languages='xx': unknown language.*spa_Latn"),
        "source as target": ({**base, "input": good, "target_languages": "[es]"}, "holds the source language"),
        "model path": ({**base, "input": good, "model_path": tmp_path / "no_model"},
                       r"translate.model_path=.*no_model.* does not exist"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "bad line", "squad as jsonl", "jsonl as json", "other language",
                                  "unknown target", "source as target", "model path"])
def test_bad_input_fails_before_any_work(case: str, tiny_nllb: Path, data_root: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_retrieval.translate import translate

    monkeypatch.chdir(tmp_path)
    options, message = _bad_inputs(tmp_path, data_root)[case]
    overrides = tiny_overrides(tiny_nllb, tmp_path, **options)
    with pytest.raises(Exception, match=message):
        translate(compose(overrides))
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started
    assert not (tmp_path / "cache.jsonl").exists()


def test_hub_checkpoint_without_local_copy_fails_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hybrid_retrieval.translate import translate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = write_jsonl(tmp_path / "good.jsonl", [{"group": "g", "language": "es", "query": "¿Qué?", "passage": "Eso."}])
    cfg = compose(["translate_model=nllb_600m", f"translate.input={good}", "translate.source_language=es",
                   "translate.target_languages=[sw]", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(FileNotFoundError, match=r"'facebook/nllb-200-distilled-600M'.*translate\.model_path="):
        translate(cfg)
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------------------------
# A real kill: the driver in a subprocess, SIGKILLed mid-run, then run again


@pytest.mark.slow
def test_resume_after_sigkill(tiny_nllb: Path, squad_es: Any, data_root: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", source_rows(squad_es, 40))
    common = dict(input=source, source_language="es", target_languages="[it]", batch_size=1)
    reference = run_stage(tiny_overrides(tiny_nllb, tmp_path / "ref", **common), tmp_path / "ref")

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "hybrid_retrieval.translate", *tiny_overrides(tiny_nllb, killed, **common),
            f"hydra.run.dir={killed}/run"]
    env = {**os.environ, "HYBRID_RETRIEVAL_DATA": str(data_root), "HYBRID_RETRIEVAL_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = killed / "cache.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if cache.exists() and len(cache.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(read_lines(cache))
    assert 8 <= done < reference.stats.translated
    with cache.open("a", encoding="utf-8") as handle:  # a write cut short by the kill
        handle.write('{"model": "half a line')

    proc = subprocess.run(args[:-1] + [f"hydra.run.dir={killed}/run2"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((killed / "run2" / "translate_stats.json").read_text())
    assert stats["translated"] == reference.stats.translated - done and stats["cache_hits"] == done
    assert len(read_lines(cache)) == reference.stats.translated  # the cut line is gone, nothing twice
    assert (killed / "out" / "pairs.jsonl").read_bytes() == (tmp_path / "ref" / "out" / "pairs.jsonl").read_bytes()
