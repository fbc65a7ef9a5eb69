"""Search passages with a model: ``python -m hybrid_retrieval.search passages=corpus.jsonl queries=q.txt output=out/``.

Encodes the passages, builds the index that ``index=flat|hnsw|ivf`` describes and saves it in ``<output>/index/``
(or loads ``index_dir=`` of an earlier run instead, re-encoding nothing), encodes the queries and writes the
top ``top_k`` hits per query as ``run.trec`` (``qid Q0 docid rank score tag``) and ``results.jsonl``.
Files, index config and model are all checked before anything is encoded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import faiss
import torch
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.cli import hydra_main
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.fingerprint import describe_file
from hybrid_retrieval.data.text_files import TEXT_COLUMNS, TextFile, read_texts
from hybrid_retrieval.evaluation.index import (PassageIndex, build_index, load_index, read_manifest, resolve_index_spec,
                                               save_index, write_search_results, write_trec_run)
from hybrid_retrieval.hardware import check_device, check_hardware
from hybrid_retrieval.models.source import check_model_source, encode_texts, load_model, model_source
from hybrid_retrieval.run_folder import output_folder


def check_search_config(cfg: DictConfig) -> tuple[TextFile, TextFile | None, dict[str, Any] | None]:
    """Validate the config and read the input files (no model loaded): (queries, passages or None, the
    manifest of ``index_dir`` or None)."""
    top_k = cfg.get("top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r}: expected a positive integer")
    if cfg.get("tag") is not None and (not str(cfg.tag) or any(c.isspace() for c in str(cfg.tag))):
        raise ConfigError(f"tag={cfg.tag!r}: expected a TREC run tag without whitespace")
    if bool(cfg.get("passages")) == bool(cfg.get("index_dir")):
        raise ConfigError(f"passages={cfg.get('passages')!r}, index_dir={cfg.get('index_dir')!r}: expected exactly "
                          "one: passages=<file> to encode and index, or index_dir=<folder> to reuse a saved index")
    check_hardware(cfg.hardware)
    check_device(cfg.hardware)
    check_model_source(cfg)
    queries = read_texts(cfg.get("queries"), "queries", cfg.id_field, cfg.text_field)
    if cfg.get("index_dir"):
        return queries, None, read_manifest(cfg.index_dir, "index_dir")
    passages = read_texts(cfg.passages, "passages", cfg.id_field, cfg.text_field)
    resolve_index_spec(_index_spec(cfg), count=len(passages))
    return queries, passages, None


def _index_spec(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.index, resolve=True) if cfg.get("index") is not None else {"type": "flat"}


def check_model_fits_index(manifest: dict[str, Any], encoder: Any, index_dir: str) -> None:
    """Queries must be embedded by the model that embedded the indexed passages."""
    if manifest.get("dim") != encoder.output_dim or manifest.get("model") != encoder.name:
        raise ConfigError(f"index_dir={index_dir!r} holds {manifest.get('dim')}-dimensional embeddings of model "
                          f"{manifest.get('model')!r}, but the queries would be encoded by {encoder.name!r} "
                          f"({encoder.output_dim} dimensions); pass the model (and model.truncate_dim) that built "
                          "the index")


def search(cfg: DictConfig) -> Path:
    """Run the search `cfg` describes (validated first) and log it to MLflow; returns the output folder."""
    queries, passages, manifest = check_search_config(cfg)
    torch.set_num_threads(cfg.hardware.num_threads)
    faiss.omp_set_num_threads(cfg.hardware.num_threads)
    encoder = load_model(cfg)
    if manifest is not None:
        check_model_fits_index(manifest, encoder, str(cfg.index_dir))
    else:
        # A factory string FAISS cannot build fails here, before the passages are encoded.
        resolve_index_spec(_index_spec(cfg), count=len(passages), dim=encoder.output_dim)
    folder = output_folder(cfg)
    tag = str(cfg.tag) if cfg.get("tag") else "_".join(encoder.name.split()) or "hybrid_retrieval"
    timings: dict[str, float] = {}
    with tracking.mlflow_run(cfg, job="search", tags={"model": encoder.name},
                             title=f"search {encoder.name}") as run:
        run.log_datasets([describe_file(f.path, "inference", file_columns=TEXT_COLUMNS, rows=len(f))
                          for f in (queries, passages) if f is not None])
        if passages is not None:
            passage_emb, timings["time/encode_passages_s"] = encode_texts(encoder, passages.texts, "passage",
                                                                           cfg.hardware)
            start = time.perf_counter()
            index = build_index(passage_emb, _index_spec(cfg), passages.ids, model=encoder.name,
                                extra={"passages": str(passages.path.resolve()), "model_source": model_source(cfg)})
            timings["time/build_index_s"] = time.perf_counter() - start
            index_dir = save_index(index, folder / "index")
        else:
            start = time.perf_counter()
            index = load_index(cfg.index_dir)
            timings["time/load_index_s"] = time.perf_counter() - start
            index_dir = Path(str(cfg.index_dir)).expanduser()
        query_emb, timings["time/encode_queries_s"] = encode_texts(encoder, queries.texts, "query", cfg.hardware)
        start = time.perf_counter()
        scores, rows = index.search(query_emb, int(cfg.top_k))
        timings["time/search_s"] = time.perf_counter() - start
        trec = write_trec_run(folder / "run.trec", queries.ids, scores, rows, index.ids, tag)
        results = write_search_results(folder / "results.jsonl", queries.ids, queries.texts, scores, rows, index.ids)
        run.log_metrics({**timings, "queries": len(queries), "passages": len(index)})
        run.log_artifact(index_dir / "manifest.json", "index")
        run.set_tag("output", str(folder.resolve()))
        run.set_tag("index", json.dumps(index.spec))
    _report(index, queries, index_dir, trec, results, timings)
    tracking.print_summary({"TREC run": trec, "results": results, "index": index_dir}, run)
    return folder


def _report(index: PassageIndex, queries: TextFile, index_dir: Path, trec: Path, results: Path,
            timings: dict[str, float]) -> None:
    spent = ", ".join(f"{k.removeprefix('time/').removesuffix('_s')} {v:.1f} s" for k, v in timings.items())
    print(f"{len(queries)} queries against {len(index)} passages ({index.spec['type']}: {index.spec['factory']}); "
          f"{spent}")


@hydra_main("search")
def main(cfg: DictConfig) -> None:
    search(cfg)


if __name__ == "__main__":
    main()
