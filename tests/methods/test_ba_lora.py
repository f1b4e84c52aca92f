"""BA-LoRA's properties (specs/methods.md, group C): with λ = 0 it is PiSSA step for step, the consistency term is
0 at init because the reference is the original model (not PiSSA's residual), and each regulariser is its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from methods.ba_lora import BALoRA, nlg_terms, nlu_terms
from methods.base import WrapContext
from tests.helpers import logits, tiny, train_steps, wrapped

ZERO = ["method.lambda1=0", "method.lambda2=0", "method.lambda3=0"]


def _trained(name: str, extra: list[str] | None = None, steps: int = 3):
    t = tiny(name, extra=extra)
    method, model = wrapped(t)
    torch.manual_seed(1)  # the same dropout masks in both runs
    train_steps(model, method, t.loader, steps=steps)
    return t, method, model


def test_zero_lambdas_match_pissa_step_for_step():
    """λ = 0 (the terms are still computed, with the extra no-grad reference forward): bit-identical to PiSSA."""
    _, pissa, pissa_model = _trained("pissa")
    _, ba, ba_model = _trained("ba_lora", ZERO)
    assert set(ba.last_terms) == {"consistency", "diversity", "svd"}, "the regularisers were not evaluated"
    ours, theirs = ba.trainable_parameters(ba_model), pissa.trainable_parameters(pissa_model)
    assert list(ours) == list(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # and the default λ do change the trajectory (the test above is not vacuous)
    _, ba, ba_model = _trained("ba_lora")
    ours = ba.trainable_parameters(ba_model)
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours)


def test_reference_is_the_original_model_and_consistency_is_zero_at_init():
    t = tiny("ba_lora")
    method, model = wrapped(t)
    model.eval()
    outputs = model(**t.batch)
    terms = method.terms(model, t.batch, outputs.logits)
    assert float(terms["consistency"]) == 0.0

    torch.manual_seed(1)
    train_steps(model, method, t.loader, steps=3)
    reference = method.reference_logits(model, t.batch)
    # W_res + s·B0·A0 with the initial head: the base model's function (disabling PiSSA's adapter would give W_res)
    torch.testing.assert_close(reference, logits(t.base, t.batch), rtol=1e-4, atol=1e-5)
    with model.disable_adapter():
        residual_only = logits(model, t.batch)
    assert not torch.allclose(residual_only, reference, rtol=1e-3, atol=1e-4)
    model.eval()
    trained = model(**t.batch).logits
    assert not torch.allclose(trained, reference), "training did not move the model away from the reference"
    assert float(method.terms(model, t.batch, trained)["consistency"]) > 0
    assert all(m.training is False for m in model.modules())  # the reference forward restored the modes it found
    model.train()
    method.reference_logits(model, t.batch)
    assert all(m.training for m in model.modules())


def _explicit_nlu(z: np.ndarray, z_ref: np.ndarray, k: int) -> dict[str, float]:
    def normalise(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    consistency = np.mean((normalise(z) - normalise(z_ref)) ** 2)
    cov = np.cov(z, rowvar=False, ddof=1)  # (C, C)
    off = [cov[i, j] ** 2 for i in range(z.shape[1]) for j in range(z.shape[1]) if i != j]
    sigma = np.linalg.svd(z, compute_uv=False)
    return {"consistency": consistency, "diversity": sum(off) / z.shape[1],
            "svd": -sigma[:k].sum() / (sigma.sum() + 1e-10)}


def _explicit_nlg(z: np.ndarray, z_ref: np.ndarray, mask: np.ndarray, k: int) -> dict[str, float]:
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()
    kl = entropy = count = 0.0
    shares = []
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            if mask[b, t]:
                p, q = softmax(z[b, t]), softmax(z_ref[b, t])
                kl += float(np.sum(q * np.log(q / p)))
                entropy += float(-np.sum(p * np.log(p)))
                count += 1
        sigma = np.linalg.svd(z[b][mask[b] == 1], compute_uv=False)  # padded rows dropped
        shares.append(sigma[:k].sum() / (sigma.sum() + 1e-10))
    return {"consistency": kl / z.shape[0], "diversity": -entropy / count, "svd": -float(np.mean(shares))}


@pytest.mark.parametrize("classes", [5, 2])
def test_nlu_terms_match_their_formulas(classes):
    g = torch.Generator().manual_seed(0)
    z, z_ref = torch.randn(7, classes, generator=g, dtype=torch.float64), torch.randn(7, classes, generator=g)
    ours = nlu_terms(z, z_ref, k=3)
    expected = _explicit_nlu(z.numpy(), z_ref.double().numpy(), k=3)
    for name, value in expected.items():
        assert float(ours[name]) == pytest.approx(value, rel=1e-5, abs=1e-9), name
    if classes <= 3:  # the top-3 share of a B×2 matrix is 1: a constant
        assert float(ours["svd"]) == pytest.approx(-1.0, abs=1e-8)


def test_nlg_terms_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    z, z_ref = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ours = nlg_terms(z, z_ref, mask, k=3)
    expected = _explicit_nlg(z.double().numpy(), z_ref.double().numpy(), mask.numpy(), k=3)
    for name, value in expected.items():
        assert float(ours[name]) == pytest.approx(value, rel=1e-5, abs=1e-8), name
    assert float(nlg_terms(z, z, mask, k=3)["consistency"]) == pytest.approx(0.0, abs=1e-7)


def test_extra_loss_is_the_weighted_sum_of_the_terms():
    t = tiny("ba_lora", extra=["method.lambda1=0.5", "method.lambda2=0.25", "method.lambda3=2.0"])
    method, model = wrapped(t)
    torch.manual_seed(1)
    train_steps(model, method, t.loader, steps=2)
    model.eval()
    outputs = model(**t.batch)
    extra = method.extra_loss(model, t.batch, outputs)
    terms = method.terms(model, t.batch, outputs.logits)
    expected = 0.5 * terms["consistency"] + 0.25 * terms["diversity"] + 2.0 * terms["svd"]
    torch.testing.assert_close(extra, expected)
    assert float(terms["consistency"]) > 0 and float(terms["diversity"]) > 0


def _tiny_causal_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def test_nlg_on_a_causal_lm_kl_is_zero_at_init_then_trains():
    base = _tiny_causal_lm()
    method = BALoRA(lr=1e-2, target_modules=["q_proj", "v_proj"], r=4, alpha=4, lambda1=1.0, lambda2=0.1, lambda3=0.1)
    model = method.prepare(base, WrapContext(head_modules=[], seed=0))
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), "labels": ids}
    model.eval()
    outputs = model(**batch)
    extra = method.extra_loss(model, batch, outputs)
    assert float(method.last_terms["consistency"]) == 0.0  # KL(p_ref ‖ p) at init
    expected = nlg_terms(outputs.logits, outputs.logits.detach(), batch["attention_mask"], k=3)
    torch.testing.assert_close(extra, 0.1 * expected["diversity"] + 0.1 * expected["svd"])
    optimizer = method.make_optimizer(model)
    for _ in range(3):
        outputs = model(**batch)
        (outputs.loss + method.extra_loss(model, batch, outputs)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(method.terms(model, batch, model(**batch).logits)["consistency"]) > 0
