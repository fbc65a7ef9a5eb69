"""Cross-device negatives and gradient caching: the same loss and gradients as one process on the global batch.

Two real processes talk over gloo (CPU). Each holds half of a fixed global batch; after backward, parameter
gradients are averaged over ranks exactly as DDP does. The reference is computed here, in one process.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

# Gradient equality across gloo processes and gradient caching: seconds per test, tens of seconds in all.
pytestmark = pytest.mark.slow

from hybrid_retrieval.losses.cached import cached_backward
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.losses.matryoshka import MatryoshkaLoss

ROWS = 8          # global batch: 4 rows per rank
NEGATIVES = (3, 1)  # hard negatives held by rank 0 and rank 1: uneven on purpose


def _batch(encoder: Any, pairs: Any) -> dict[str, Any]:
    tokenize = encoder.tokenize
    return {"query": tokenize(pairs.queries[:ROWS], "query"), "passage": tokenize(pairs.passages[:ROWS], "passage"),
            "negative": tokenize(pairs.passages[ROWS:ROWS + sum(NEGATIVES)], "passage")}


def _rows(inputs: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop] for k, v in inputs.items()}


def _loss_and_grads(encoder: Any, loss: InfoNCELoss, batch: dict[str, Any], chunk: int | None = None
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    if chunk is None:
        value = loss(encoder(**batch["query"]), encoder(**batch["passage"]),
                     encoder(**batch["negative"]) if batch["negative"] is not None else None)
        value.backward()
    else:
        groups = {"query": batch["query"], "passage": batch["passage"], "negative": batch["negative"]}
        value = cached_backward(encoder, groups, lambda e: loss(e["query"], e["passage"], e["negative"]), chunk)
    grads = {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return float(value.detach()), grads


def _worker(rank: int, world: int, port: int, encoder: Any, batch: dict[str, Any],
            variants: dict[str, dict[str, Any]], out: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {name: _rank_step(rank, world, encoder, batch, options) for name, options in variants.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _rank_step(rank: int, world: int, encoder: Any, batch: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    half = ROWS // world
    start = sum(NEGATIVES[:rank])
    local = {"query": _rows(batch["query"], rank * half, (rank + 1) * half),
             "passage": _rows(batch["passage"], rank * half, (rank + 1) * half),
             "negative": _rows(batch["negative"], start, start + NEGATIVES[rank])}
    if not options.get("negatives", True):
        local["negative"] = None
    loss = InfoNCELoss(temperature=0.05, symmetric=options.get("symmetric", False),
                       gather_across_devices=options["gather"])
    if options.get("matryoshka"):
        loss = MatryoshkaLoss(loss, options["matryoshka"], [1.0, 0.5, 0.25])
    value, grads = _loss_and_grads(encoder, loss, local, options.get("chunk"))
    # What DDP does after backward: average every gradient (and here the loss, for the comparison) over ranks.
    mean = torch.tensor([value])
    dist.all_reduce(mean)
    for grad in grads.values():
        dist.all_reduce(grad)
        grad /= world
    return {"loss": float(mean) / world, "grads": grads}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every two-process variant runs in one pair of processes (starting them is most of the cost).
VARIANTS = {
    "gather": {"gather": True},
    "gather_symmetric": {"gather": True, "symmetric": True},
    "local": {"gather": False},
    "gather_cached": {"gather": True, "chunk": 3},
    "gather_no_negatives": {"gather": True, "negatives": False},
    "gather_cached_matryoshka": {"gather": True, "chunk": 3, "matryoshka": [64, 32, 16]},
}


@pytest.fixture(scope="module")
def setup(tiny_encoder: Any, data_root: Path) -> tuple[Any, dict[str, Any]]:
    from hybrid_retrieval.data.lareqa_pairs import from_lareqa

    pairs = from_lareqa("xquad_r", data_root, languages=["en"], max_groups=ROWS + sum(NEGATIVES))
    encoder = copy.deepcopy(tiny_encoder).eval()  # no dropout: one process and two must see the same network
    return encoder, _batch(encoder, pairs)


@pytest.fixture(scope="module")
def two_ranks(setup: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    encoder, batch = setup
    out = str(tmp_path_factory.mktemp("ddp") / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), encoder, batch, VARIANTS, out), nprocs=2, join=True,
                       start_method="spawn")
    return torch.load(out, weights_only=True)


def _assert_same(result: dict[str, Any], loss: float, grads: dict[str, torch.Tensor]) -> None:
    assert result["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert result["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        # A gradient such as the token-type table's sums every token of the batch; the chunked and the whole-batch
        # runs add those terms in different orders (the packed forward gathers the real tokens of each chunk), so
        # fp32 rounding scales with the tensor's largest entry: the absolute bound follows it (1e-6 below 0.25).
        atol = max(1e-6, 4e-6 * float(grad.abs().max()))
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gathered_negatives_equal_one_process_on_the_global_batch(setup: Any, two_ranks: Any, symmetric: bool) -> None:
    encoder, batch = setup
    result = two_ranks["gather_symmetric" if symmetric else "gather"]
    loss, grads = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05, symmetric=symmetric), batch)
    _assert_same(result, loss, grads)


def test_without_gathering_each_rank_trains_on_its_own_rows(setup: Any, two_ranks: Any) -> None:
    encoder, batch = setup
    result = two_ranks["local"]
    losses, per_rank = [], []
    half = ROWS // 2
    for rank in range(2):
        start = sum(NEGATIVES[:rank])
        local = {"query": _rows(batch["query"], rank * half, (rank + 1) * half),
                 "passage": _rows(batch["passage"], rank * half, (rank + 1) * half),
                 "negative": _rows(batch["negative"], start, start + NEGATIVES[rank])}
        loss, grads = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05), local)
        losses.append(loss)
        per_rank.append(grads)
    _assert_same(result, sum(losses) / 2, {n: (per_rank[0][n] + per_rank[1][n]) / 2 for n in per_rank[0]})
    # And that differs from the global batch: the negatives really are fewer.
    global_loss, _ = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05), batch)
    assert abs(global_loss - result["loss"]) > 1e-3


def test_gradient_caching_with_gathered_negatives_equals_the_plain_global_batch(setup: Any, two_ranks: Any) -> None:
    encoder, batch = setup
    result = two_ranks["gather_cached"]
    loss, grads = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05), batch)
    _assert_same(result, loss, grads)


def test_matryoshka_with_gradient_caching_and_gathered_negatives_equals_the_plain_global_batch(
        setup: Any, two_ranks: Any) -> None:
    encoder, batch = setup
    result = two_ranks["gather_cached_matryoshka"]
    loss = MatryoshkaLoss(InfoNCELoss(temperature=0.05), [64, 32, 16], [1.0, 0.5, 0.25])
    value, grads = _loss_and_grads(copy.deepcopy(encoder), loss, batch)
    _assert_same(result, value, grads)
    plain, _ = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05), batch)
    assert value > plain + 1e-3  # the truncated terms are really there


def test_no_hard_negatives_on_any_rank(setup: Any, two_ranks: Any) -> None:
    encoder, batch = setup
    result = two_ranks["gather_no_negatives"]
    loss, grads = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05), {**batch, "negative": None})
    _assert_same(result, loss, grads)


@pytest.mark.parametrize("chunk", [1, 3, 8, 100])
def test_gradient_caching_equals_the_plain_computation(setup: Any, chunk: int) -> None:
    encoder, batch = setup
    plain_loss, plain = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05, symmetric=True), batch)
    cached_loss, cached = _loss_and_grads(copy.deepcopy(encoder), InfoNCELoss(temperature=0.05, symmetric=True), batch,
                                          chunk=chunk)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_caching_replays_dropout(setup: Any) -> None:
    # With dropout on, the cached gradients equal those of the same chunk-wise forward passes with a graph: each
    # chunk's second pass replays the random state of its first.
    encoder, batch = setup
    chunk = 3
    cached_model, plain_model = copy.deepcopy(encoder).train(), copy.deepcopy(encoder).train()
    loss = InfoNCELoss(temperature=0.05)
    torch.manual_seed(7)
    cached_loss, cached = _loss_and_grads(cached_model, loss, batch, chunk=chunk)
    torch.manual_seed(7)
    embeddings = {}
    for name in ("query", "passage", "negative"):
        rows = batch[name]["input_ids"].shape[0]
        embeddings[name] = torch.cat([plain_model(**_rows(batch[name], s, s + chunk)) for s in range(0, rows, chunk)])
    plain_loss = loss(embeddings["query"], embeddings["passage"], embeddings["negative"])
    plain_loss.backward()
    assert cached_loss == pytest.approx(float(plain_loss), rel=1e-6)
    for name, parameter in plain_model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(cached[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the replay the masks would differ: a plain forward pass with a fresh seed gives another loss.
    torch.manual_seed(8)
    other = loss(plain_model(**batch["query"]), plain_model(**batch["passage"]), plain_model(**batch["negative"]))
    assert float(other) != pytest.approx(cached_loss, rel=1e-6)


def test_ddp_run_on_two_cpu_processes(tmp_path: Path, data_root: Path) -> None:
    """`run.py hardware=ddp_cpu`: one MLflow run; every global batch one hybrid batch; validation as one process."""
    import json

    from tests.test_cli import REPO_ROOT, SMALL_EVAL, SMALL_TRAIN, mlflow_client, run_command

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    proc = run_command(["run.py", "hardware=ddp_cpu", "hardware.devices=2", "train.log_batches=true", *SMALL_TRAIN,
                        f"logger.tracking_uri={uri}", f"hydra.run.dir={out}"], data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hybrid_retrieval").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["job"] == "train"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/multi/map")) == [0, 3]

    ranks = [[json.loads(line) for line in (out / "batches" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [b["step"] for b in ranks[0]] == [b["step"] for b in ranks[1]] == [0, 1, 2]
    kinds = set()
    for mine, theirs in zip(*ranks):
        assert mine["kind"] == theirs["kind"]  # one global batch: monolingual or cross-lingual on every rank
        kinds.add(mine["kind"])
        if mine["kind"] == "mono":
            assert mine["languages"] == theirs["languages"] and len(mine["languages"]) == 1
            assert mine["passage_languages"] == mine["languages"]
        assert len(mine["rows"]) == len(theirs["rows"]) == 8
        assert not {tuple(r) for r in mine["rows"]} & {tuple(r) for r in theirs["rows"]}  # distinct rows
    assert run.data.metrics["train/mono_batch"] in (0.0, 1.0)

    # Validation encoded on two ranks equals a one-process evaluation of the same (exported) weights.
    trained = json.loads((out / "metrics.json").read_text())
    single = tmp_path / "single"
    proc = run_command(["-m", "hybrid_retrieval.evaluate", f"model.path={out / 'model'}", *SMALL_EVAL,
                        "rankings_top_k=0", f"logger.tracking_uri={uri}", f"hydra.run.dir={single}"],
                       data_root, REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((single / "metrics.json").read_text())
    for setting, values in trained["summary"].items():
        for metric, value in values.items():
            assert evaluated["summary"][setting][metric] == pytest.approx(value, abs=1e-9), (setting, metric)
