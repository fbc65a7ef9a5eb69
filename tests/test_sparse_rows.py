"""train.sparse_embeddings: the row-sparse AdamW of the vocabulary matrix gives dense AdamW's weights."""

from __future__ import annotations

import copy
import io

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from hybrid_retrieval.losses.info_nce import InfoNCELoss
from hybrid_retrieval.models.encoder import load_encoder
from hybrid_retrieval.training.module import HybridRetrievalModule, OptimizerSettings
from hybrid_retrieval.training.sparse_rows import RowSparseAdamW, clip_gradients

TEXTS = [f"word{i} other{i % 7} thing{i % 3} and more {i * 13}" for i in range(96)]


class Toy(nn.Module):
    """An embedding (only some rows ever read) and a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding = nn.Embedding(50, 8)
        self.linear = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embedding(ids)).pow(2).mean()


def _optimizers(dense_model: Toy, sparse_model: Toy, lr: float, decay: float):
    dense = torch.optim.AdamW([{"params": [dense_model.embedding.weight, dense_model.linear.weight],
                                "weight_decay": decay},
                               {"params": [dense_model.linear.bias], "weight_decay": 0.0}], lr=lr)
    sparse = RowSparseAdamW([{"params": [sparse_model.linear.weight], "weight_decay": decay},
                             {"params": [sparse_model.linear.bias], "weight_decay": 0.0}],
                            sparse_model.embedding, lr=lr, embedding_weight_decay=decay, fused=True)
    return dense, sparse


def test_row_sparse_adamw_equals_adamw_under_a_schedule_with_clipping_and_a_restart() -> None:
    dense_model, sparse_model = Toy(), Toy()
    dense, sparse = _optimizers(dense_model, sparse_model, lr=0.05, decay=0.3)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (dense, sparse)]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 20, (6,), generator=generator) for _ in range(12)]  # rows 20..49: never read
    initial_unread = dense_model.embedding.weight[30].detach().clone()
    for step, ids in enumerate(batches):
        if step == 6:  # the sparse optimiser restarts from its saved state (a resumed run)
            buffer = io.BytesIO()
            torch.save(sparse.state_dict(), buffer)
            weights = copy.deepcopy(sparse_model.state_dict())
            sparse_model = Toy()
            sparse_model.load_state_dict(weights)
            sparse_lr = [group["lr"] for group in sparse.param_groups]
            _, sparse = _optimizers(Toy(), sparse_model, lr=0.05, decay=0.3)
            sparse.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
            assert [group["lr"] for group in sparse.param_groups] == sparse_lr
            schedules[1] = torch.optim.lr_scheduler.LambdaLR(sparse, lambda step: 1.0 / (1 + step),
                                                            last_epoch=step - 1)
        for model, optimizer in ((dense_model, dense), (sparse_model, sparse)):
            optimizer.zero_grad()
            model(ids).backward()
        assert sparse_model.embedding.weight.grad.is_sparse
        torch.nn.utils.clip_grad_norm_(list(dense_model.parameters()), 0.01)
        clip_gradients(sparse, 0.01)
        dense.step()
        sparse.step()
        for schedule in schedules:
            schedule.step()
    sparse_weights = sparse_model.state_dict()  # reading the whole matrix applies the pending decay
    for name, value in dense_model.state_dict().items():
        torch.testing.assert_close(sparse_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # A row never read moved by weight decay alone: the product of (1 - lr_t * decay) over the steps.
    factor = 1.0
    for step in range(12):
        factor *= 1 - 0.05 / (1 + step) * 0.3
    torch.testing.assert_close(sparse_weights["embedding.weight"][30], initial_unread * factor, rtol=1e-6, atol=0)
    assert sparse.state[sparse_model.embedding.weight]["count"] == len(torch.unique(torch.cat(batches)))


def test_clipping_a_sparse_gradient_matches_clipping_its_dense_equivalent() -> None:
    dense_model, sparse_model = Toy(), Toy()
    _, sparse = _optimizers(Toy(), sparse_model, lr=0.1, decay=0.0)
    ids = torch.tensor([1, 1, 4, 9, 4, 4])  # repeated rows: the norm is of the summed gradient
    dense_model(ids).backward()
    sparse_model(ids).backward()
    torch.nn.utils.clip_grad_norm_(list(dense_model.parameters()), 0.05)
    clip_gradients(sparse, 0.05)
    torch.testing.assert_close(sparse_model.embedding.weight.grad.to_dense(), dense_model.embedding.weight.grad)
    torch.testing.assert_close(sparse_model.linear.weight.grad, dense_model.linear.weight.grad)


STEPS = 6


def _train(sparse: bool, precision: str = "32-true", grad_cache_chunk: int | None = None, steps: int = STEPS):
    torch.manual_seed(0)
    encoder = load_encoder(name="tiny", source="random", max_query_length=16, max_passage_length=16, seed=3)
    module = HybridRetrievalModule(encoder, InfoNCELoss(temperature=0.05), OptimizerSettings(1e-3, 0.1, 0.0, "linear"),
                                   gradient_clip_val=0.5, sparse_embeddings=sparse, grad_cache_chunk=grad_cache_chunk)

    def collate(rows: list) -> dict:
        rows = rows[0]
        return {"query": encoder.tokenize(rows, "query"), "passage": encoder.tokenize(rows[::-1], "passage"),
                "monolingual": True, "rows": [], "languages": [], "passage_languages": []}

    loader = torch.utils.data.DataLoader([TEXTS[i * 8:(i + 1) * 8] for i in range(steps)], batch_size=1,
                                         collate_fn=collate)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision=precision,
                         gradient_clip_val=None if grad_cache_chunk else 0.5, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    assert isinstance(trainer.optimizers[0], RowSparseAdamW) == sparse
    if sparse:  # training ended with the matrix's true values in place, before anything reads it whole
        state = trainer.optimizers[0].state[encoder.backbone.get_input_embeddings().weight]
        assert state["pending"] == 1.0 and 0 < state["count"] < encoder.backbone.config.vocab_size
    return {name: value.detach().clone() for name, value in encoder.state_dict().items()}


@pytest.mark.parametrize("precision,grad_cache_chunk", [("32-true", None), ("bf16-mixed", None),
                                                        pytest.param("32-true", 3, marks=pytest.mark.slow)])
def test_training_with_sparse_embeddings_ends_at_the_dense_weights(precision: str, grad_cache_chunk: int | None) -> None:
    dense, sparse = (_train(flag, precision, grad_cache_chunk) for flag in (False, True))
    embedding = "backbone.embeddings.word_embeddings.weight"
    assert not torch.equal(dense[embedding], _train(False, precision, grad_cache_chunk, steps=1)[embedding])
    # fp32: rounding only. bf16: the forward pass rounds to 3 digits, so rounding-level differences in the
    # embeddings flip some roundings. Adam's step m / sqrt(v) does not scale with the gradient, so an element whose
    # tiny gradient flips sign under such a rounding moves by up to 2 lr (seen for 8 of 16M elements on a CPU that
    # emulates bf16): every element within 2 lr a step, and all but a handful within the rounding tolerance.
    if precision == "32-true":
        for name, value in dense.items():
            torch.testing.assert_close(sparse[name], value, rtol=1e-4, atol=1e-5, msg=name)
        return
    # The attention key biases get no true gradient at all (softmax ignores a shift shared by every key): they move
    # by Adam steps on rounding noise alone.
    off = sum(int((~torch.isclose(sparse[name], value, rtol=1e-3, atol=1e-4)).sum()) for name, value in dense.items())
    assert off < 1e-5 * sum(value.numel() for value in dense.values()), off
    for name, value in dense.items():
        assert (sparse[name] - value).abs().max().item() <= 2 * 1e-3 * STEPS, name
