"""SaRA's properties (specs/methods.md, group C): only the entries with |w| < τ ever move, the mid-run mask update
freezes the entries that grew past τ while the survivors keep their optimizer state, and the low-rank term is the
nuclear norm of W ⊙ M."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch

from methods.sara import SaRA, SaRALinear
from tests.helpers import logits, tiny, train_steps, wrapped

TAU = 2e-3


def _sara(extra: list[str] | None = None):
    t = tiny("sara", extra=["method.rank_min_dim=0", *(extra or [])])  # tiny BERT layers are 64 wide
    method, model = wrapped(t)
    assert isinstance(method, SaRA)
    return t, method, model


def _loop_step(model, method, optimizer, batch, step):
    """One step in the loop's order (bench/train.py), on a given batch."""
    method.on_step_begin(model, step)
    outputs = model(**batch)
    loss = outputs.loss
    extra = method.extra_loss(model, batch, outputs)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    method.on_after_backward(model, step)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return method.on_step_end(model, step, optimizer)


def test_mask_is_the_absolute_threshold_and_the_model_starts_at_the_base():
    t, method, model = _sara()
    layers = method.adapted_layers(model)
    assert layers
    for name, layer in layers.items():
        w0 = t.base.get_submodule(name).weight.detach()
        expected = torch.nonzero(w0.reshape(-1).abs() < TAU).squeeze(1)
        assert torch.equal(layer.index, expected)
        assert torch.equal(layer.values.detach(), w0.reshape(-1)[expected])
        assert torch.equal(layer.weight().detach(), w0), "init must be W0 bit for bit"
        assert 0 < layer.values.numel() < w0.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = sum(int((t.base.get_submodule(n).weight.abs() < TAU).sum()) for n in layers)
    head = sum(p.numel() for p in t.base.classifier.parameters())
    assert trainable == masked + head == method.expected_trainable(copy.deepcopy(t.base), t.ctx)


def test_entries_at_or_above_threshold_stay_bit_identical():
    """After training through the mask update (λ > 0), every entry with |w0| ≥ τ equals W0 bit for bit."""
    t, method, model = _sara(["method.lr=5e-3", "method.total_steps=8"])  # the update after step 4
    train_steps(model, method, t.loader, steps=8)
    assert method._active, "the mask update did not happen"
    merged = method.merge(copy.deepcopy(model))
    moved = 0
    for name in method.adapted_layers(model):
        w0 = t.base.get_submodule(name).weight.detach()
        w = merged.get_submodule(name).weight.detach()
        frozen = w0.abs() >= TAU
        assert torch.equal(w[frozen], w0[frozen]), f"{name}: an entry with |w0| >= tau moved"
        moved += int((w[~frozen] != w0[~frozen]).sum())
    assert moved > 0, "no entry below tau moved"


def test_mask_update_freezes_grown_entries_and_keeps_survivor_state():
    """Through the real loop: at the update step, the new mask is |w| < τ on the current entries; the survivors'
    Adam moments are untouched, the dropped entries' are zeroed; afterwards the dropped entries never move again and
    the optimizer is not rebuilt (the parameter tensors are the same)."""
    t, method, model = _sara(["method.lr=2e-3", "method.total_steps=6"])  # update after step 3
    seen: dict[str, object] = {"optimizers": []}
    make, end = method.make_optimizer, method.on_step_end

    def make_optimizer(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        seen["optimizers"].append(optimizer)
        return optimizer

    def on_step_end(m, step, optimizer):
        if step + 1 == method.progressive_step:
            seen["before"] = {n: {k: v.clone() for k, v in optimizer.state[l.values].items()}
                              for n, l in method.adapted_layers(m).items()}
            seen["values"] = {n: l.values.detach().clone() for n, l in method.adapted_layers(m).items()}
        rebuild = end(m, step, optimizer)
        if step + 1 == method.progressive_step:
            seen["after"] = {n: {k: v.clone() for k, v in optimizer.state[l.values].items()}
                             for n, l in method.adapted_layers(m).items()}
        assert rebuild is False
        return rebuild

    method.make_optimizer, method.on_step_end = make_optimizer, on_step_end
    train_steps(model, method, t.loader, steps=6)
    assert len(seen["optimizers"]) == 1
    dropped_total = kept_total = 0
    for name, layer in method.adapted_layers(model).items():
        values = seen["values"][name]
        keep = method._active[name]
        assert torch.equal(keep, values.abs() < TAU)
        before, after = seen["before"][name], seen["after"][name]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[key][keep], before[key][keep]), f"{name}: survivor {key} changed"
            assert torch.all(after[key][~keep] == 0), f"{name}: dropped {key} not reset"
        assert torch.equal(after["step"], before["step"])
        now = layer.values.detach()
        assert torch.equal(now[~keep], values[~keep]), f"{name}: a frozen entry moved after the update"
        dropped_total += int((~keep).sum())
        kept_total += int((now[keep] != values[keep]).sum())
    assert dropped_total > 0 and kept_total > 0, (dropped_total, kept_total)


def test_nuclear_norm_term_is_the_sum_of_singular_values_of_the_masked_weight():
    t, method, model = _sara(["method.lr=5e-3"])
    train_steps(model, method, t.loader, steps=2)  # values away from W0
    merged = method.merge(copy.deepcopy(model))
    masked = {}  # W ⊙ M built from the merged weight and W0 alone
    for name in method.rank_layers(model):
        w0 = t.base.get_submodule(name).weight.detach().double()
        w = merged.get_submodule(name).weight.detach().double()
        masked[name] = torch.where(w0.abs() < TAU, w, torch.zeros_like(w)).numpy()
    method.on_step_begin(model, 0)
    name = method._rank_layer
    assert name in masked
    sigma = np.linalg.svd(masked[name], compute_uv=False)
    term = float(method.extra_loss(model, t.batch, None))
    assert abs(term - method.lambda_rank * sigma.sum()) <= 1e-5 * method.lambda_rank * sigma.sum()

    # its gradient is λ·U·Vᵀ restricted to the mask (checked on the best-conditioned layer: U·Vᵀ is unique there)
    def conditioning(n):
        s = np.linalg.svd(masked[n], compute_uv=False)
        return s[-1] / s[0]
    method._rank_layer = name = max(masked, key=conditioning)
    assert conditioning(name) > 1e-3
    layer = model.get_submodule(name)
    layer.values.grad = None
    method.extra_loss(model, t.batch, None).backward()
    u, _, vh = np.linalg.svd(masked[name], full_matrices=False)
    grad = method.lambda_rank * (u @ vh).reshape(-1)[layer.index.numpy()]
    np.testing.assert_allclose(layer.values.grad.double().numpy(), grad, rtol=1e-3, atol=1e-4 * method.lambda_rank)


def test_nuclear_norm_layers_follow_the_size_rule_and_the_seed():
    t = tiny("sara")  # rank_min_dim = 64: no tiny-BERT layer (64 wide) qualifies
    method, model = wrapped(t)
    assert method.rank_layers(model) == []
    method.on_step_begin(model, 0)
    assert method.extra_loss(model, t.batch, None) is None

    draws = []
    for _ in range(2):
        _, method, model = _sara()
        draws.append([(method.on_step_begin(model, s), method._rank_layer)[1] for s in range(12)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_resume_after_the_mask_update_continues_identically():
    """Adapter + method state + optimizer state saved after the update, loaded into a fresh run: the next steps
    (same batches) are bit-identical to the uninterrupted run's."""
    t, method, model = _sara(["method.lr=2e-3", "method.total_steps=4"])  # update after step 2
    model.eval()  # no dropout: both runs see the same function
    batches = list(itertools.islice(iter(t.loader), 5))
    optimizer = method.make_optimizer(model)
    for step in range(3):
        _loop_step(model, method, optimizer, batches[step], step)
    assert method._active
    saved = (copy.deepcopy(method.adapter_state_dict(model)), copy.deepcopy(method.state_dict()),
             copy.deepcopy(optimizer.state_dict()))

    fresh_method, fresh = wrapped(t)
    fresh_method.load_adapter_state_dict(fresh, saved[0])
    fresh_method.load_state_dict(saved[1])
    fresh.eval()
    fresh_optimizer = fresh_method.make_optimizer(fresh)
    fresh_optimizer.load_state_dict(saved[2])
    for step in range(3, 5):
        _loop_step(model, method, optimizer, batches[step], step)
        _loop_step(fresh, fresh_method, fresh_optimizer, batches[step], step)
    for (n, a), (_, b) in zip(method.trainable_parameters(model).items(),
                              fresh_method.trainable_parameters(fresh).items()):
        assert torch.equal(a, b), n
    torch.testing.assert_close(logits(fresh, t.batch), logits(model, t.batch), rtol=0, atol=0)


def test_layer_scatter_matches_a_dense_masked_weight():
    base = torch.nn.Linear(5, 4)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1e-3, 0.5, -1e-4, 0.2, 3e-3]] * 4))
    layer = SaRALinear(base, TAU)
    assert layer.values.numel() == 8  # two entries per row below τ
    with torch.no_grad():
        layer.values.add_(1.0)
    expected = torch.where(base.weight.abs() < TAU, base.weight + 1.0, base.weight)
    assert torch.equal(layer.weight().detach(), expected.detach())
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), x @ expected.T + base.bias)
