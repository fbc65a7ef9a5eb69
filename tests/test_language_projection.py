"""Language-subspace removal (models/language_projection.py): the fit against a numpy reference, the encoder and
the export applying it, and the evaluate command fitting, saving and using it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hybrid_retrieval.models.language_projection import (FILE, LanguageProjection, check_projection_config,
                                                         fit_projection)
from tests.test_export import assert_same_embeddings, perturbed_tiny, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]

SENTENCES = ["The cat sat on the mat.", "Die Katze sass auf der Matte.", "El gato se sento en la alfombra.",
             "A short one.", "Ein ziemlich langer Satz mit vielen Woertern, der mehrere Tokens belegt."]


def _clusters(seed: int = 0, languages: int = 4, per_language: int = 50, dim: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = rng.normal(size=(languages, dim)) * 2.0
    shared = rng.normal(size=(per_language, dim))
    return {f"l{i}": shared + offsets[i] + rng.normal(size=shared.shape) * 0.1 for i in range(languages)}


def test_fit_matches_a_numpy_reference() -> None:
    embeddings = _clusters()
    projection = fit_projection(embeddings, rank=2)
    means = np.stack([e.mean(axis=0) for e in embeddings.values()])
    centred = means - means.mean(axis=0)
    # reference: the top-2 principal directions of the centred means, from the eigenvectors of M^T M
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = vectors[:, np.argsort(values)[::-1][:2]]
    np.testing.assert_allclose(projection.basis @ projection.basis.T, top @ top.T, atol=1e-5)
    np.testing.assert_allclose(projection.basis.T @ projection.basis, np.eye(2), atol=1e-6)
    assert projection.singular_values == pytest.approx(sorted(np.sqrt(np.clip(values, 0, None)))[::-1][:4], abs=1e-6)
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    expected = x - x @ top @ top.T
    np.testing.assert_allclose(projection.apply(x), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-5)
    np.testing.assert_allclose(projection.matrix(), np.eye(16) - top @ top.T, atol=1e-6)


def test_full_rank_brings_every_language_mean_to_one_point() -> None:
    embeddings = _clusters()
    projection = fit_projection(embeddings, rank=3)  # L - 1
    projected = np.stack([(e - (e @ projection.basis) @ projection.basis.T).mean(axis=0)
                          for e in embeddings.values()])
    assert np.abs(projected - projected[0]).max() < 1e-5
    # rank 1 leaves differences: the means do not meet
    one = fit_projection(embeddings, rank=1)
    partial = np.stack([(e - (e @ one.basis) @ one.basis.T).mean(axis=0) for e in embeddings.values()])
    assert np.abs(partial - partial[0]).max() > 0.5


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match=r"rank=4: expected an integer in 1\.\.3"):
        fit_projection(_clusters(), rank=4)
    with pytest.raises(ValueError, match="at least 2 languages"):
        fit_projection({"en": np.ones((3, 4))}, rank=1)
    for options, message in (({"rank": 0}, "rank=0"), ({"rank": 1, "texts": "test"}, "texts='test'"),
                             ({"rank": 1, "texts": "files"}, "path=<folder"), ({"rank": 1, "size": 3}, "'size'"),
                             ({"rank": 1, "per_language": -1}, "per_language=-1"), ("yes", "expected null")):
        with pytest.raises(ValueError, match=message):
            check_projection_config(options)
    check_projection_config(None)
    check_projection_config({"rank": 2, "texts": "tatoeba", "per_language": 100})


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    projection = fit_projection(_clusters(), rank=2, source="synthetic")
    loaded = LanguageProjection.load(projection.save(tmp_path))
    np.testing.assert_array_equal(loaded.basis, projection.basis)
    assert (loaded.languages, loaded.source, loaded.rank) == (projection.languages, "synthetic", 2)


def test_encoder_and_sentence_transformers_export_apply_it(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from hybrid_retrieval.models.encoder import load_encoder
    from hybrid_retrieval.models.model_folder import export_encoder

    encoder, config = perturbed_tiny(seed=3)
    plain = encoder.encode(SENTENCES, "passage")
    projection = fit_projection({"x": plain[:3], "y": plain[3:]}, rank=1)
    encoder.language_projection = projection
    ours = encoder.encode(SENTENCES, "passage")
    np.testing.assert_allclose(ours, projection.apply(plain), atol=1e-6)
    assert np.abs(ours @ projection.basis).max() < 1e-5   # nothing left along the language direction
    assert np.abs(plain @ projection.basis).max() > 1e-2

    folder = export_encoder(encoder, tmp_path / "model")
    model = SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    for kind, prompt in (("query", "query"), ("passage", "document")):
        assert_same_embeddings(encoder.encode(SENTENCES, kind),
                               model.encode(SENTENCES, prompt_name=prompt, convert_to_numpy=True), kind)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    reloaded = load_encoder(**{**kwargs, "path": str(folder)})
    assert reloaded.language_projection is not None and (folder / FILE).is_file()
    np.testing.assert_allclose(reloaded.encode(SENTENCES, "passage"), ours, atol=2e-5)


@pytest.mark.slow
def test_evaluate_fits_saves_and_applies_it(tmp_path: Path, data_root: Path) -> None:
    common = ["hybrid_retrieval.evaluate", "model=tiny", "dataset=xquad_r", "dataset.languages=[en,de,el]",
              "dataset.max_questions_per_language=20", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    plain = run_cli([*common, f"hydra.run.dir={tmp_path / 'plain'}", "save_embeddings=true"], data_root)
    assert plain.returncode == 0, plain.stderr[-3000:]
    projected = run_cli([*common, f"hydra.run.dir={tmp_path / 'projected'}",
                         "model.language_projection={rank: 2, texts: tatoeba, per_language: 50, "
                         "languages: [en, de, el]}"], data_root)
    assert projected.returncode == 0, projected.stderr[-3000:]
    projection = LanguageProjection.load(tmp_path / "projected" / FILE)
    assert projection.rank == 2 and set(projection.languages) == {"eng", "deu", "ell"}
    before = json.loads((tmp_path / "plain" / "metrics.json").read_text())["summary"]["multi"]["map"]
    after = json.loads((tmp_path / "projected" / "metrics.json").read_text())["summary"]["multi"]["map"]
    assert before != after   # the projection changed the rankings
    # the same projection over the saved embeddings (embeddings=<folder>): the same metrics, nothing re-encoded
    rescored = run_cli([*common, f"hydra.run.dir={tmp_path / 'rescored'}", f"embeddings={tmp_path / 'plain'}",
                        "model.language_projection={rank: 2, texts: tatoeba, per_language: 50, "
                        "languages: [en, de, el]}"], data_root)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    again = json.loads((tmp_path / "rescored" / "metrics.json").read_text())["summary"]
    assert again == json.loads((tmp_path / "projected" / "metrics.json").read_text())["summary"]
    wrong = run_cli([*common, "dataset.max_questions_per_language=10", f"hydra.run.dir={tmp_path / 'wrong'}",
                     f"embeddings={tmp_path / 'plain'}"], data_root)
    assert wrong.returncode != 0 and "embeddings of another dataset or slice" in wrong.stderr
    refused = run_cli([*common, f"hydra.run.dir={tmp_path / 'bad'}", "model.language_projection={rank: 0}"],
                      data_root)
    assert refused.returncode != 0 and "model.language_projection.rank=0" in refused.stderr
    assert not (tmp_path / "bad" / "metrics.json").exists()


@pytest.mark.slow
def test_a_training_run_keeps_its_embeddings_and_evaluate_rescores_them(tmp_path: Path, data_root: Path) -> None:
    from tests.test_cli import SMALL_TRAIN, run_command

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tmp_path / "run"
    trained = run_command(["run.py", *SMALL_TRAIN, "save_embeddings=true",
                           f"logger.tracking_uri={uri}", f"hydra.run.dir={run}"], data_root, REPO_ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert np.load(run / "query_emb.npy").ndim == 2 and np.load(run / "candidate_emb.npy").ndim == 2
    rescored = run_cli(["hybrid_retrieval.evaluate", f"checkpoint={run}/checkpoints/best.ckpt",
                        f"embeddings={run}", f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp_path / 'eval'}",
                        *[a for a in SMALL_TRAIN if a.startswith("dataset.")]], data_root)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    # the run's final evaluation, recomputed from its saved embeddings: the same metrics
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"] == \
        json.loads((run / "metrics.json").read_text())["summary"]


def test_texts_from_files_per_language(tmp_path: Path) -> None:
    from hybrid_retrieval.models.language_projection import projection_texts

    (tmp_path / "de.txt").write_text("eins\n\nzwei\ndrei\n", encoding="utf-8")
    (tmp_path / "sw.txt").write_text("moja\nmbili\n", encoding="utf-8")
    options = {"rank": 1, "texts": "files", "path": str(tmp_path), "per_language": 2}
    assert projection_texts(options) == {"de": ["eins", "zwei"], "sw": ["moja", "mbili"]}
    assert projection_texts({**options, "languages": ["sw"]}) == {"sw": ["moja", "mbili"]}
    with pytest.raises(FileNotFoundError, match="no <language>.txt files"):
        projection_texts({**options, "path": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="texts='train'"):
        check_projection_config({"rank": 1, "texts": "train"})
