"""AdaLoRA's properties through PEFT: on_step_end hands PEFT's allocator the step's gradients (which the loop has
already released) and the budget schedule masks singular values down to target_r × #layers, which stay masked; the
trainable count is init_r·(m + n + 1); the orthogonal regulariser is PEFT's; a resumed run (allocator state and rank
pattern restored) ends exactly where the uninterrupted one does."""

from __future__ import annotations

import torch

from methods.adalora import AdaLoRA
from tests.helpers import tiny, train_steps, wrapped
from tests.methods.resume import resume_matches_uninterrupted


def adalora(extra: list[str] | None = None):
    t = tiny("adalora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, AdaLoRA)
    return t, method, model


def test_schedule_comes_from_the_run_length():
    t, method, model = adalora(["train.max_steps=100"])
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal, config.init_r, config.target_r) == (100, 12, 44, 12, 8)


def test_budget_masks_singular_values_down_to_the_target_and_keeps_them_masked():
    steps = 12
    t, method, model = adalora([f"train.max_steps={steps}"])  # tinit 1, tfinal 5: budgeting at steps 2..6
    n_layers = len(method.tuner_layers(model))
    assert sum(method.ranks(model).values()) == 0  # E = 0 at init (init == base)
    train_steps(model, method, t.loader, steps=steps)
    ranks = method.ranks(model)
    assert sum(ranks.values()) == method.target_r * n_layers
    assert len(set(ranks.values())) > 1  # the budget is allocated unevenly
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None and sum(sum(v) for v in pattern.values()) == method.target_r * n_layers
    for name, layer in method.tuner_layers(model).items():
        e = layer.lora_E["default"].detach().view(-1)
        keep = torch.tensor(next(v for k, v in pattern.items() if k.startswith(name + ".")))
        assert torch.all(e[~keep] == 0) and torch.all(e[keep] != 0), name
    assert method.post_train(model, t.ctx)["adalora_total_rank"] == method.target_r * n_layers


def test_the_allocator_sees_the_gradients_and_the_loop_still_releases_them():
    t, method, model = adalora()
    train_steps(model, method, t.loader, steps=1)
    alloc = model.base_model.rankallocator
    assert alloc.exp_avg_ipt and all(v.abs().max() > 0 for v in alloc.exp_avg_ipt.values())
    assert all(p.grad is None for _, p in method.lora_parameters(model))


def test_trainable_count_includes_the_singular_values():
    t, method, model = adalora()
    per_layer = {n: sum(p.numel() for pn, p in model.named_parameters() if p.requires_grad and f".{n}." in f".{pn}")
                 for n in method.tuner_layers(model)}
    for name, layer in method.tuner_layers(model).items():
        base = layer.get_base_layer()
        assert per_layer[name] == method.init_r * (base.in_features + base.out_features + 1)


def test_extra_loss_is_pefts_orthogonal_regulariser():
    t, method, model = adalora()
    loss = method.extra_loss(model, t.batch, None)
    terms = []
    for n, p in model.named_parameters():
        if "lora_A" in n:
            terms.append(torch.linalg.norm(p.detach() @ p.detach().T - torch.eye(p.shape[0])))
        elif "lora_B" in n:
            terms.append(torch.linalg.norm(p.detach().T @ p.detach() - torch.eye(p.shape[1])))
    torch.testing.assert_close(loss.detach(), method.orth_reg_weight * torch.stack(terms).mean())


def test_resume_mid_budget_equals_the_uninterrupted_run(tmp_path):
    # T = 10: tinit 1, tfinal 4; checkpoint after step 4 (inside the budgeting phase), kill after step 6
    (method, model), (resumed, model2) = resume_matches_uninterrupted("adalora", [], tmp_path, steps=10, every=4,
                                                                     die_after=6)
    assert method.ranks(model) == resumed.ranks(model2)
    assert model.peft_config["default"].rank_pattern == model2.peft_config["default"].rank_pattern
