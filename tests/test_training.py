"""Training pieces without the slow end-to-end runs: datamodule, one training step, the learning-rate schedule,
the best-checkpoint callback, config flattening, the monitor check and the MLflow run lifecycle."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from hybrid_retrieval import tracking
from hybrid_retrieval.config_error import ConfigError
from hybrid_retrieval.data.lareqa import load_split
from hybrid_retrieval.data.lareqa_pairs import from_lareqa
from hybrid_retrieval.evaluation.lareqa_protocol import evaluate_encoder
from hybrid_retrieval.evaluation.lareqa import LareqaSet
from hybrid_retrieval.evaluation.sets import EvaluationSet, monitor_keys
from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.training.callbacks import BestCheckpoint
from hybrid_retrieval.training.config import check_train_config
from hybrid_retrieval.training.datamodule import HybridDataModule
from hybrid_retrieval.training.module import HybridRetrievalModule, OptimizerSettings, lr_factor
from hybrid_retrieval.training.sampler import HybridBatchSampler
from hybrid_retrieval.training.train import build_datamodule

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def pairs(data_root: Path) -> Any:
    return from_lareqa("mlqa_r", data_root, languages=["en", "de", "es"], max_groups=80)


@pytest.fixture(scope="module")
def evaluation_set(data_root: Path) -> EvaluationSet:
    return LareqaSet("xquad_r", load_split("xquad_r", data_root, languages=["en", "de"],
                                               max_questions_per_language=10))


def tiny_module(tiny_encoder: Any, freeze_embeddings: bool = False) -> HybridRetrievalModule:
    import copy

    return HybridRetrievalModule(copy.deepcopy(tiny_encoder), InfoNCELoss(temperature=0.05),
                                 OptimizerSettings(lr=1e-3, warmup_ratio=0.25), model_config={"name": "tiny"},
                                 freeze_embeddings=freeze_embeddings)


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_datamodule_owns_sampler_collation_and_evaluation_sets(tmp_path: Path, pairs: Any, tiny_encoder: Any,
                                                               evaluation_set: EvaluationSet) -> None:
    sampler = partial(HybridBatchSampler, mono_ratio=1.0, name="mono")
    datamodule = HybridDataModule([pairs], sampler, batch_size=8, seed=3, evaluation_sets=[evaluation_set])
    module = tiny_module(tiny_encoder)
    fitter = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fitter.fit(module, datamodule=datamodule)
    assert fitter.global_step == 2
    loader = datamodule.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(datamodule.sampler) > 2
    for batch in batches[:3]:
        assert batch["query"]["input_ids"].shape[0] == 8 and batch["monolingual"] is True
        # The collator uses the trained model's tokenizer: its prefix is the first token sequence.
        prefix = module.encoder.tokenizer("query: ", add_special_tokens=False)["input_ids"]
        assert batch["query"]["input_ids"][0, 1:1 + len(prefix)].tolist() == prefix
    # Lightning sets the epoch on the batch sampler: another epoch, other batches.
    first = [b for b in datamodule.sampler]
    datamodule.sampler.set_epoch(1)
    assert [b for b in datamodule.sampler] != first
    assert list(datamodule.val_dataloader()) == [evaluation_set]


def test_a_batch_size_the_data_cannot_fill_fails_before_the_model(data_root: Path) -> None:
    cfg = composed(["model=tiny", "sampler=mono", "train.batch_size=500", "train_data.datasets.0.max_groups=100",
                    f"train_data.datasets.0.root={data_root}", f"dataset.root={data_root}"])
    with pytest.raises(ConfigError, match="train.batch_size=500"):
        build_datamodule(cfg)


def test_training_step_is_the_loss_of_the_encoded_batch(pairs: Any, tiny_encoder: Any) -> None:
    module = tiny_module(tiny_encoder, freeze_embeddings=True)
    tokenize = module.encoder.tokenize
    batch = {"query": tokenize(pairs.queries[:6], "query"), "passage": tokenize(pairs.passages[:6], "passage"),
             "monolingual": False}
    module.eval()  # no dropout: the reference below must see the same network
    loss = module.training_step(batch, 0)
    expected = InfoNCELoss(temperature=0.05)(module.encoder(**batch["query"]), module.encoder(**batch["passage"]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    embeddings = module.encoder.backbone.get_input_embeddings().weight
    assert embeddings.grad is None  # frozen
    assert module.encoder.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    module.dynamic_padding = True  # train.dynamic_padding: the same loss from length-sorted chunks
    assert module.training_step(batch, 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dynamic_padding_with_a_left_padding_tokenizer_is_refused_naming_the_option(tiny_encoder: Any) -> None:
    import copy

    from hybrid_retrieval.config_error import ConfigError

    encoder = copy.deepcopy(tiny_encoder)
    HybridRetrievalModule(encoder, InfoNCELoss(0.05), OptimizerSettings(), dynamic_padding=True)
    encoder.tokenizer.padding_side = "left"
    HybridRetrievalModule(encoder, InfoNCELoss(0.05), OptimizerSettings())  # off: nothing to refuse
    with pytest.raises(ConfigError, match=r"train\.dynamic_padding=true: .*pads on the left.*"
                                          r"set train\.dynamic_padding=false"):
        HybridRetrievalModule(encoder, InfoNCELoss(0.05), OptimizerSettings(), dynamic_padding=True)


def test_dynamic_padding_gives_the_same_embeddings_and_gradients_with_less_padded_work(
        pairs: Any, tiny_encoder: Any) -> None:
    import copy

    from hybrid_retrieval.training.module import embed_by_length

    # Passages of very different lengths: the batch is padded to the longest, the chunks to their own.
    order = sorted(range(40), key=lambda i: len(pairs.passages[i]))
    texts = [pairs.passages[i] for i in order[:6] + order[-2:]]
    padded_model, chunked_model = copy.deepcopy(tiny_encoder).eval(), copy.deepcopy(tiny_encoder).eval()
    inputs = padded_model.tokenize(texts, "passage")
    lengths = inputs["attention_mask"].sum(dim=1)
    assert lengths.max() > 2 * lengths.min()  # there is padding to drop
    reference = padded_model(**inputs)
    calls: list[int] = []
    chunked_model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].numel()),
                                            with_kwargs=True)
    chunked = embed_by_length(chunked_model, inputs)
    assert len(calls) >= 2 and sum(calls) < inputs["input_ids"].numel()  # fewer token slots than the padded batch
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-5)  # same rows, same order
    weights = torch.randn_like(reference)
    (reference * weights).sum().backward()
    (chunked * weights).sum().backward()
    for (name, a), b in zip(padded_model.named_parameters(), chunked_model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    # A batch without padding is one forward pass, as before.
    even = padded_model.tokenize([texts[0]] * 3, "passage")
    calls.clear()
    embed_by_length(chunked_model, even)
    assert len(calls) == 1


@pytest.mark.parametrize("schedule,values", [
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0,
                0.0]),
])
def test_lr_schedule_by_hand(schedule: str, values: list[float]) -> None:
    # 6 steps in all, 2 of warm-up: (step + 1) / 2, then the schedule over the remaining 4 steps.
    assert [lr_factor(step, 6, 2, schedule) for step in range(8)] == pytest.approx(values)


def test_optimiser_groups_and_the_schedule_lightning_steps(tmp_path: Path, pairs: Any, tiny_encoder: Any,
                                                          evaluation_set: EvaluationSet) -> None:
    module = tiny_module(tiny_encoder, freeze_embeddings=True)
    datamodule = HybridDataModule([pairs], partial(HybridBatchSampler, mono_ratio=0.5), 8, 0, [evaluation_set])

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.lrs: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    recorder = Recorder()
    fitter = trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[recorder])
    fitter.fit(module, datamodule=datamodule)
    optimizer = fitter.optimizers[0]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.named_parameters()}
    assert all(p.ndim >= 2 for p in decayed["params"])
    assert any("LayerNorm" in names[id(p)] for p in plain["params"])
    embeddings = module.encoder.backbone.get_input_embeddings().weight
    assert all(p is not embeddings for group in optimizer.param_groups for p in group["params"])
    # 4 steps, warm-up int(0.25 * 4) = 1: lr 1e-3 * [1, 1, 2/3, 1/3].
    assert recorder.lrs == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_best_checkpoint_validates_the_last_weights_when_fit_ends_without_validation(
        tmp_path: Path, pairs: Any, tiny_encoder: Any, evaluation_set: EvaluationSet) -> None:
    module = tiny_module(tiny_encoder)
    datamodule = HybridDataModule([pairs], partial(HybridBatchSampler, mono_ratio=0.5), 8, 0, [evaluation_set])
    checkpoint = BestCheckpoint(tmp_path / "checkpoints", "val/multi/map", "max")
    # max_steps ends the epoch before Lightning's epoch-end validation: nothing validated during fit.
    fitter = trainer(tmp_path, max_steps=3, callbacks=[checkpoint], enable_checkpointing=True)
    fitter.validate(module, datamodule=datamodule, verbose=False)  # step 0: not a candidate
    fitter.fit(module, datamodule=datamodule)
    assert checkpoint.validated_steps == [] and checkpoint.needs_final_validation(fitter)
    assert checkpoint.zero_shot_metrics and checkpoint.best_step is None
    with checkpoint.final_validation():
        fitter.validate(module, datamodule=datamodule, verbose=False)
    assert checkpoint.validated_steps == [3] and checkpoint.best_step == 3
    assert Path(checkpoint.best_model_path).is_file()
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    assert saved["hybrid_retrieval"] == {"format": 1, "model": {"name": "tiny"}}
    # The kept results are those of the final validation, and equal a fresh evaluation of the same weights.
    fresh = evaluate_encoder(module.encoder, evaluation_set.split)
    assert checkpoint.best_results["xquad_r"].summary == fresh.summary
    assert checkpoint.best_metrics["val/multi/map"] == pytest.approx(fresh.summary["multi"]["map"])
    # A validation outside fit that is not the final one never replaces the best checkpoint.
    fitter.validate(module, datamodule=datamodule, verbose=False)
    assert checkpoint.validated_steps == [3]


def test_flatten_config_is_what_mlflow_params_show() -> None:
    cfg = composed(["model=tiny", "dataset.languages=[en,de]", "logger.tracking_uri=sqlite:///x.db"])
    flat = tracking.flatten_config(cfg)
    assert flat["train.lr"] == "5e-05" and flat["sampler.mono_ratio"] == "0.5"
    assert flat["loss.temperature"] == "0.05" and flat["loss._target_"].endswith("InfoNCELoss")
    assert flat["dataset.languages"] == "['en', 'de']" and flat["extra_datasets"] == "{}"
    assert flat["train_data.datasets"].startswith("[{'_target_': 'hybrid_retrieval.data.lareqa_pairs.from_lareqa'")
    assert flat["model.tiny.hidden_size"] == "64"
    assert not any("${" in value for value in flat.values())  # resolved
    long = tracking.flatten_config(OmegaConf.create({"a": {"b": "x" * 7000}}))
    assert len(long["a.b"]) == tracking.MAX_PARAM_LENGTH


@pytest.mark.parametrize("monitor,mode,ok", [
    ("val/multi/map", "max", True),
    ("val/multi/rank_distance", "min", True),
    ("val/xquad_r/cross/ndcg_at_10", "max", True),
    ("val/mono/rank_distance", "min", False),  # mono does not log a rank distance
    ("val/multi/rank_distance", "max", False),
    ("val/multi/map", "min", False),
    ("val/loss", "min", False),
    ("train/loss", "min", False),
    ("val/mlqa_r/multi/map", "max", False),  # not an evaluation set of this run
])
def test_monitor_accepts_exactly_what_validation_logs(monitor: str, mode: str, ok: bool) -> None:
    cfg = composed(["model=tiny", f"train.monitor={monitor}", f"train.monitor_mode={mode}"])
    if ok:
        check_train_config(cfg)
    else:
        with pytest.raises(ConfigError, match="train.monitor"):
            check_train_config(cfg)
    assert ("val/multi/map" in monitor_keys("xquad_r")) and ("val/mono/rank_distance" not in monitor_keys("xquad_r"))


def test_monitor_may_name_an_extra_set() -> None:
    cfg = composed(["model=tiny", "+dataset@extra_datasets.mlqa=mlqa_r", "train.monitor=val/mlqa/multi/map"])
    check_train_config(cfg)


def _runs(uri: str) -> list[Any]:
    client = tracking.get_client(uri)
    experiment = client.get_experiment_by_name("lifecycle")
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow
@pytest.mark.parametrize("error,status", [(None, "FINISHED"), (ValueError("bad batch"), "FAILED"),
                                          (KeyboardInterrupt(), "KILLED")])
def test_mlflow_run_lifecycle(tmp_path: Path, error: BaseException | None, status: str) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create({"logger": {"tracking_uri": uri, "experiment_name": "lifecycle"}, "run_name": "r1",
                            "train": {"lr": 0.1}})
    try:
        with tracking.mlflow_run(cfg, job="unit", tags={"model": "tiny"}) as run:
            run.log_metrics({"val/multi/map": 0.5, "bad": float("nan")}, step=3)
            if error is not None:
                raise error
    except BaseException as caught:  # noqa: BLE001 - the error must come back unchanged
        assert caught is error
    (logged,) = _runs(uri)
    assert logged.info.status == status and logged.info.run_name == "r1"
    assert logged.data.params == {"logger.tracking_uri": uri, "logger.experiment_name": "lifecycle",
                                  "run_name": "r1", "train.lr": "0.1"}
    assert logged.data.tags["job"] == "unit" and logged.data.tags["model"] == "tiny"
    assert logged.data.metrics == {"val/multi/map": 0.5}
    if error is not None:
        assert logged.data.tags["error"].startswith(type(error).__name__)
    else:
        assert "error" not in logged.data.tags


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(pairs: Any, tiny_encoder: Any) -> None:
    import copy

    grads = []
    for checkpointing in (False, True):
        module = HybridRetrievalModule(copy.deepcopy(tiny_encoder), InfoNCELoss(), OptimizerSettings(),
                                       gradient_checkpointing=checkpointing)
        assert module.encoder.backbone.is_gradient_checkpointing == checkpointing
        module.train()
        for layer in module.encoder.backbone.modules():  # no dropout, so both runs compute the same function
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        tokenize = module.encoder.tokenize
        loss = module.loss(module(tokenize(pairs.queries[:6], "query")), module(tokenize(pairs.passages[:6], "passage")))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_training_with_gradient_caching_steps_like_plain_training(tmp_path: Path, pairs: Any, tiny_encoder: Any,
                                                                  evaluation_set: EvaluationSet) -> None:
    """Through Lightning: manual optimisation with cached gradients (clipping included) = automatic optimisation."""
    import copy

    weights = []
    for chunk in (None, 3):
        encoder = copy.deepcopy(tiny_encoder)
        for layer in encoder.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.p = 0.0
        module = HybridRetrievalModule(encoder, InfoNCELoss(temperature=0.05), OptimizerSettings(lr=1e-3),
                                       grad_cache_chunk=chunk, gradient_clip_val=0.5 if chunk else None)
        datamodule = HybridDataModule([pairs], partial(HybridBatchSampler, mono_ratio=0.5), 8, 0, [evaluation_set])
        fitter = trainer(tmp_path / str(chunk), max_steps=3, limit_val_batches=0,
                         gradient_clip_val=None if chunk else 0.5)
        fitter.fit(module, datamodule=datamodule)
        assert fitter.global_step == 3
        weights.append({n: p.detach().clone() for n, p in module.named_parameters()})
    changed = beyond = total = 0
    for name, value in weights[0].items():
        # Updates are about lr = 1e-3 per step. Adam normalises each gradient by its own size, so where a true
        # gradient is near zero, float rounding alone (which differs between chunked and whole-batch sums) can move
        # an element by up to lr a step: every element stays within 2 lr a step, and all but 1e-5 of them within
        # the rounding tolerance (the rule of test_sparse_rows).
        difference = (weights[1][name] - value).abs()
        assert float(difference.max()) <= 2 * 1e-3 * 3, name
        beyond += int((difference > 2e-5 + 1e-4 * value.abs()).sum())
        total += value.numel()
        changed += int(not torch.equal(value, tiny_encoder.state_dict().get(name.removeprefix("encoder."), value)))
    assert beyond <= 1e-5 * total, f"{beyond} of {total} elements beyond the rounding tolerance"
    assert changed > 0  # training moved the weights
