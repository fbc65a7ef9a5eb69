"""oneDNN linear layers for fp32 CPU encoding: same embeddings as torch's default linear, actually used by
``Encoder.encode``, model restored afterwards, training and autocast untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybrid_retrieval.kernels import onednn as cpu_kernels
from hybrid_retrieval.kernels.onednn import onednn_linears

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="this torch build has no oneDNN linear operator")

TEXTS = [
    "Wer hat die Relativitätstheorie entwickelt?",
    "¿Cuántos habitantes tiene la ciudad más grande de Australia según el censo de 2016?",
    "什么是光合作用？",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.",
    "Когда была основана Москва?",
    "a",
] * 5


def _ops_run(fn) -> dict[str, int]:
    """Operator name -> number of calls while `fn` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key: event.count for event in prof.key_averages()}


def _snapshot(model: nn.Module) -> tuple[dict[str, type], dict[str, torch.Tensor]]:
    classes = {name: type(m) for name, m in model.named_modules()}
    return classes, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_encode_runs_onednn_and_matches_the_default_linear(me5_small) -> None:
    ops = _ops_run(lambda: me5_small.encode(TEXTS, "passage", batch_size=8))
    assert "mkldnn::_linear_pointwise" in ops
    assert "aten::addmm" not in ops and "aten::gelu" not in ops  # every linear layer and GELU went through oneDNN
    # Four products a layer (Q/K/V joined, output, feed-forward in + GELU, feed-forward out), and length-sorted
    # batches attend in place: no scatter into a padded buffer, no gather back.
    layers = me5_small.backbone.config.num_hidden_layers
    batches = ops["aten::native_layer_norm"] // (2 * layers + 1)  # two LayerNorms a layer, one after embeddings
    assert ops["mkldnn::_linear_pointwise"] == 4 * layers * batches
    assert "aten::index_copy" not in ops  # per layer that would be one scatter and one gather
    assert ops.get("aten::index_select", 0) < layers * batches  # what is left: the embeddings' lookups

    fast = me5_small.encode(TEXTS, "passage", batch_size=8)
    with torch.inference_mode():  # the plain module call: torch's default linear and GELU
        batch = me5_small.tokenize(TEXTS, "passage")
        reference = me5_small(batch["input_ids"], batch["attention_mask"]).numpy()
    assert abs(fast - reference).max() < 1e-5

    # bf16 encoding keeps autocast's own kernels.
    ops_bf16 = _ops_run(lambda: me5_small.encode(TEXTS[:6], "query", dtype=torch.bfloat16))
    assert "mkldnn::_linear_pointwise" not in ops_bf16


def test_the_model_is_restored_exactly_also_after_an_error(tiny_encoder) -> None:
    classes, state = _snapshot(tiny_encoder)
    acts = [m.intermediate_act_fn for m in tiny_encoder.modules() if hasattr(m, "intermediate_act_fn")]
    assert acts, "the tiny BERT has feed-forward blocks"

    with onednn_linears(tiny_encoder):
        inside = {type(m) for m in tiny_encoder.modules()}
        assert cpu_kernels.OneDNNGeluLinear in inside and cpu_kernels.OneDNNLinear in inside
        assert nn.Linear not in inside
    with pytest.raises(RuntimeError, match="boom"), onednn_linears(tiny_encoder):
        raise RuntimeError("boom")

    after_classes, after_state = _snapshot(tiny_encoder)
    assert after_classes == classes
    assert after_state.keys() == state.keys() and all(torch.equal(after_state[k], state[k]) for k in state)
    assert [m.intermediate_act_fn for m in tiny_encoder.modules() if hasattr(m, "intermediate_act_fn")] == acts


def test_threads_encoding_with_one_model_get_the_same_embeddings_and_leave_it_restored(tiny_encoder) -> None:
    """Two threads encode with one model at once, many times: every result equals the single-threaded one and
    the model ends as it started (a second swap inside the first once took the swapped layers for the originals:
    GELU stayed replaced by the identity after both blocks ended)."""
    import copy
    import threading

    model = copy.deepcopy(tiny_encoder)
    classes, state = _snapshot(model)
    acts = [m.intermediate_act_fn for m in model.modules() if hasattr(m, "intermediate_act_fn")]
    expected = model.encode(TEXTS, "passage", batch_size=4)
    start = threading.Barrier(2)
    results: list = []
    errors: list = []

    def work() -> None:
        try:
            for _ in range(6):
                start.wait()
                results.append(model.encode(TEXTS, "passage", batch_size=4))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 12, errors
    assert all(abs(result - expected).max() < 1e-5 for result in results)
    assert _snapshot(model)[0] == classes
    assert [m.intermediate_act_fn for m in model.modules() if hasattr(m, "intermediate_act_fn")] == acts
    assert abs(model.encode(TEXTS, "passage", batch_size=4) - expected).max() < 1e-5
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_training_and_autocast_inside_the_block_are_unchanged(tiny_encoder) -> None:
    batch = tiny_encoder.tokenize(TEXTS[:6], "query")

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny_encoder.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both runs
        loss = tiny_encoder(batch["input_ids"], batch["attention_mask"]).pow(3).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tiny_encoder.parameters() if p.grad is not None]

    tiny_encoder.train()
    plain_loss, plain_grads = loss_and_grads()
    with onednn_linears(tiny_encoder):
        kernel_loss, kernel_grads = loss_and_grads()
    tiny_encoder.eval()
    assert torch.equal(plain_loss, kernel_loss)
    assert len(plain_grads) == len(kernel_grads) and all(torch.equal(a, b) for a, b in zip(plain_grads, kernel_grads))

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = tiny_encoder(batch["input_ids"], batch["attention_mask"])
        with onednn_linears(tiny_encoder):
            inside = tiny_encoder(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(plain, inside)


def test_only_exact_gelu_blocks_are_fused() -> None:
    class Intermediate(nn.Module):  # the BERT feed-forward shape, with a given activation
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.dense = nn.Linear(8, 16)
            self.intermediate_act_fn = act

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.intermediate_act_fn(self.dense(x))

    exact, tanh = Intermediate(nn.GELU()), Intermediate(nn.GELU(approximate="tanh"))
    x = torch.randn(3, 5, 8)
    with torch.inference_mode():
        expected = (exact(x), tanh(x))
        with onednn_linears(exact), onednn_linears(tanh):
            assert type(exact.dense) is cpu_kernels.OneDNNGeluLinear
            assert isinstance(exact.intermediate_act_fn, nn.Identity)
            assert type(tanh.dense) is cpu_kernels.OneDNNLinear and tanh.intermediate_act_fn.approximate == "tanh"
            got = (exact(x), tanh(x))
    for want, have in zip(expected, got):
        assert (want - have).abs().max() < 1e-5

    with onednn_linears(exact, enabled=False):
        assert type(exact.dense) is nn.Linear


def test_joined_qkv_equals_the_separate_layers(tiny_encoder) -> None:
    attention = next(m for m in tiny_encoder.modules() if hasattr(m, "query") and hasattr(m, "value"))
    hidden = torch.randn(11, attention.query.in_features)
    with torch.inference_mode():
        scale = cpu_kernels.attention_scale(attention)  # the queries come pre-scaled for the scores
        expected = torch.cat([attention.query(hidden) * scale, attention.key(hidden), attention.value(hidden)], -1)
        assert cpu_kernels.fused_qkv(attention) is None
        with onednn_linears(tiny_encoder):
            joined = cpu_kernels.fused_qkv(attention)
            assert joined is not None and joined.weight.shape == (expected.shape[1], hidden.shape[1])
            got = joined(hidden)
            # Not a registered submodule or parameter: checkpoints and optimisers do not see it.
            assert not any("fused" in name for name, _ in tiny_encoder.named_parameters())
        assert cpu_kernels.fused_qkv(attention) is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
