"""DyLoRA's properties (specs/methods.md, group D): the components above the sampled rank b get no gradient (and, in
frozen mode, those below b neither); the rank sampler is seeded and resumes exactly; inference and merge work at any
b; post_train scores several ranks from one run and leaves the model at full rank."""

from __future__ import annotations

import copy

import torch

from methods.base import WrapContext
from methods.dylora import DyLoRA, DyLoRALinear
from tests.helpers import logits, tiny, wrapped
from tests.methods.resume import resume_matches_uninterrupted


def dylora(extra: list[str] | None = None):
    t = tiny("dylora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, DyLoRA)
    return t, method, model


def layers(method: DyLoRA, model: torch.nn.Module) -> dict[str, DyLoRALinear]:
    return method.adapted_layers(model)  # type: ignore[return-value]


def randomize_b(method: DyLoRA, model: torch.nn.Module) -> None:
    """B = 0 at init hides A's gradient and every rank's ΔW; give it random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers(method, model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)


def grads_at_rank(method: DyLoRA, model: torch.nn.Module, batch: dict, b: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    method.set_train_rank(model, b)
    model(**batch).loss.backward()
    return {n: (layer.A.grad, layer.B.grad) for n, layer in layers(method, model).items()}  # type: ignore[misc]


def row_nonzero(a_grad: torch.Tensor, b_grad: torch.Tensor) -> list[bool]:
    """Per component i: does a_i (row i of A) or b_i (column i of B) have a non-zero gradient?"""
    return [bool(a_grad[i].abs().max() > 0 or b_grad[:, i].abs().max() > 0) for i in range(a_grad.shape[0])]


def test_components_above_b_get_no_gradient_and_those_up_to_b_do():
    t, method, model = dylora(["method.dropout=0.0"])
    randomize_b(method, model)
    for b in (1, 3, method.r):
        for name, (ga, gb) in grads_at_rank(method, model, t.batch, b).items():
            assert row_nonzero(ga, gb) == [i < b for i in range(method.r)], (name, b)


def test_frozen_mode_trains_only_component_b():
    t, method, model = dylora(["method.frozen=true"])
    randomize_b(method, model)
    for b in (1, 4, method.r):
        for name, (ga, gb) in grads_at_rank(method, model, t.batch, b).items():
            assert row_nonzero(ga, gb) == [i == b - 1 for i in range(method.r)], (name, b)


def test_frozen_mode_forward_equals_the_normal_forward():
    """Detaching changes gradients only: the frozen forward computes the same function at every b."""
    t, method, model = dylora(["method.frozen=true"])
    randomize_b(method, model)
    free = copy.deepcopy(model)
    for layer in layers(method, free).values():
        layer.frozen = False
    for b in (2, 5):
        method.set_train_rank(model, b)
        method.set_train_rank(free, b)
        model.train(), free.train()
        torch.manual_seed(0)
        out = model(**t.batch).logits
        torch.manual_seed(0)
        torch.testing.assert_close(out, free(**t.batch).logits, rtol=0, atol=0)


def test_rank_sampling_is_uniform_seeded_and_shared_by_all_layers():
    t, method, model = dylora()
    draws = []
    for step in range(400):
        method.on_step_begin(model, step)
        assert {layer.train_rank for layer in layers(method, model).values()} == {method.b}
        draws.append(method.b)
    counts = torch.bincount(torch.tensor(draws), minlength=method.r + 1)[1:]
    assert counts.min() > 0 and set(draws) <= set(range(1, method.r + 1))
    assert counts.max() < 2 * 400 / method.r  # roughly uniform: no rank drawn twice its share

    _, again, model2 = dylora()
    seq = []
    for step in range(400):
        again.on_step_begin(model2, step)
        seq.append(again.b)
    assert seq == draws  # the same seed draws the same sequence

    t3 = tiny("dylora", extra=["seed=1"])
    other = t3.method()
    other.prepare(copy.deepcopy(t3.base), WrapContext(head_modules=t3.ctx.head_modules, seed=1))
    other_seq = []
    for step in range(400):
        other.on_step_begin(model2, step)
        other_seq.append(other.b)
    assert other_seq != draws


def test_inference_and_merge_at_every_rank():
    t, method, model = dylora()
    randomize_b(method, model)
    full = logits(model, t.batch)
    outputs = {}
    for b in range(1, method.r + 1):
        method.set_inference_rank(model, b)
        outputs[b] = logits(model, t.batch)
        deltas = method.delta_weights(model)
        for name, layer in layers(method, model).items():
            expected = (method.alpha / b) * layer.B.detach().double()[:, :b] @ layer.A.detach().double()[:b]
            torch.testing.assert_close(deltas[name].double(), expected, rtol=0, atol=1e-6)
            assert int(torch.linalg.matrix_rank(deltas[name].double(), rtol=1e-6)) == b
        merged = method.merge(copy.deepcopy(model))
        assert not any(isinstance(m, DyLoRALinear) for m in merged.modules())
        torch.testing.assert_close(logits(merged, t.batch), outputs[b], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(outputs[1], outputs[method.r])  # the rank matters
    torch.testing.assert_close(outputs[method.r], full, rtol=0, atol=0)  # default inference rank: r_max


def test_post_train_scores_every_configured_rank_and_leaves_the_full_rank():
    t, method, model = dylora()
    seen = []

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        (rank,) = {layer.infer_rank for layer in layers(method, m).values()}
        seen.append(rank)
        return {"accuracy": rank / 10, "f1": 0.0}

    assert method.post_train(model, t.ctx) == {}  # no evaluate in the context: nothing to score
    ctx = WrapContext(head_modules=t.ctx.head_modules, evaluate=evaluate, main_metric="accuracy")
    metrics = method.post_train(model, ctx)
    assert seen == method.eval_ranks == [1, 2, 4, 8]
    assert metrics == {f"accuracy@r={b}": b / 10 for b in method.eval_ranks}
    assert {layer.infer_rank for layer in layers(method, model).values()} == {method.r}


def test_resume_mid_run_equals_the_uninterrupted_run(tmp_path):
    (method, _), (resumed, _) = resume_matches_uninterrupted("dylora", [], tmp_path, steps=8, every=3, die_after=5)
    assert resumed.b == method.b
