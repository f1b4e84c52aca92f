"""Properties of NOLA, Block-LoRA, Hydra and WaRA beyond the shared checklist (specs/methods.md, group A)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from methods.base import WrapContext
from methods.lora import LoRA
from methods.structured_lora import (
    BlockLoRA,
    BlockLoRALinear,
    Hydra,
    HydraLinear,
    NOLALinear,
    SeededBasis,
    WaRA,
    WaRALinear,
    stable_seed,
)
from tests.helpers import REPO, logits, tiny, train_steps, wrapped


def linear(n: int, m: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, m, bias=bias)


def randomize(module: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Give every trainable tensor of `module` a random value (zero-initialised factors hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def one_layer_model(n: int, m: int) -> nn.Module:
    return nn.Sequential(OrderedDict(fc=linear(n, m)))


# ============================================================================================ shared
def test_stable_seed_is_the_same_in_a_fresh_process():
    """The per-layer seed must not depend on Python's salted hash(): a new process derives the same value."""
    code = "from methods.structured_lora import stable_seed; print(stable_seed(0, 'bert.encoder.layer.0.attention.self.query'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)})
    assert int(out.stdout) == stable_seed(0, "bert.encoder.layer.0.attention.self.query")
    assert stable_seed(0, "a") != stable_seed(1, "a") != stable_seed(0, "b")


# ============================================================================================ NOLA
def nola_layer(n: int = 12, m: int = 10, r: int = 3, k: int = 70, l: int = 66, seed: int = 5) -> NOLALinear:
    # k and l above SeededBasis.BLOCK (64): the combination crosses a block boundary and ends on a partial block
    return NOLALinear(linear(n, m), r=r, alpha=6.0, k=k, l=l, seed=seed)


def test_nola_bases_are_uniform_over_sqrt_k():
    basis = SeededBasis(seed=3, count=100, shape=(8, 64))
    b = basis.materialize()  # (100, 8, 64)
    bound = 1 / math.sqrt(100)
    assert b.shape == (100, 8, 64) and b.abs().max() <= bound
    assert abs(b.mean().item()) < 0.02 * bound and abs(b.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    for (_, _, b32), (_, _, b64) in zip(basis.uniform_blocks(torch.device("cpu"), torch.float32),
                                        basis.uniform_blocks(torch.device("cpu"), torch.float64)):
        assert torch.equal(b64, b32.double())  # the same draws whatever the dtype (they are made in fp32)
    u = torch.cat([blk for _, _, blk in basis.uniform_blocks(torch.device("cpu"), torch.float32)])
    torch.testing.assert_close(b, (2 * u - 1) * bound)  # materialize() and the training path share their draws


def test_nola_factors_equal_the_explicit_linear_combination():
    layer = nola_layer()
    randomize(layer)
    ba, bb = layer.basis_a.materialize(), layer.basis_b.materialize()  # (k, r, n), (l, m, r)
    a = layer.A0 + torch.einsum("k,krn->rn", layer.alpha.detach(), ba)
    b = torch.einsum("l,lmr->mr", layer.beta.detach(), bb)
    torch.testing.assert_close(layer.delta().detach(), layer.scaling * b @ a, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 7, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight(), layer.bias()), rtol=1e-5, atol=1e-6)


def test_nola_coefficient_gradients_are_inner_products_with_the_bases():
    """∂L/∂α_i = ⟨∂L/∂A, 𝒜_i⟩ and ∂L/∂β_j = ⟨∂L/∂B, ℬ_j⟩ through the regenerate-in-backward autograd function."""
    layer = nola_layer()
    randomize(layer)
    x, w = torch.randn(5, 12), torch.randn(5, 10)
    (layer(x) * w).sum().backward()

    a, b = (t.detach().requires_grad_() for t in layer.factors())  # leaves standing for A (r, n) and B (m, r)
    y = layer.base(x) + layer.scaling * nn.functional.linear(nn.functional.linear(x, a), b)
    (y * w).sum().backward()
    expected_alpha = torch.einsum("krn,rn->k", layer.basis_a.materialize(), a.grad)
    expected_beta = torch.einsum("lmr,mr->l", layer.basis_b.materialize(), b.grad)
    torch.testing.assert_close(layer.alpha.grad, expected_alpha, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.beta.grad, expected_beta, rtol=1e-5, atol=1e-6)


def test_nola_autograd_keeps_no_basis():
    """The memory trick: no tensor of the size of the k bases (or of one block of them) is saved for backward."""
    layer = nola_layer(n=64, m=48, r=4, k=200, l=200)
    randomize(layer)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(3, 64)).sum().backward()
    assert saved and max(saved) < SeededBasis.BLOCK * 4 * 48  # one block of ℬ would be 64·48·4 numbers


def test_nola_only_coefficients_are_trained_and_saved():
    t = tiny("nola")
    method, model = wrapped(t)
    state = method.adapter_state_dict(model)
    adapter_keys = [k for k in state if not k.startswith("classifier.")]
    assert adapter_keys and all(k.endswith((".alpha", ".beta")) for k in adapter_keys)
    assert {state[k].numel() for k in adapter_keys} == {method.k, method.l} == {512}
    # neither the bases nor A0 is part of any checkpoint: they are regenerated from the seed
    base_keys = set(t.base.state_dict())
    extra = {k for k in model.state_dict() if k.replace(".base.", ".") not in base_keys}
    assert extra == set(adapter_keys)  # no A0, no basis: only α and β join the base model's tensors


def test_nola_same_seed_regenerates_identical_bases_and_delta():
    t = tiny("nola")
    method1, model1 = wrapped(t)
    train_steps(model1, method1, t.loader, steps=2)
    method2, model2 = wrapped(t)  # a fresh wrap: the global RNG has moved on, the layer seeds have not
    method2.load_adapter_state_dict(model2, method1.adapter_state_dict(model1))
    d1, d2 = method1.delta_weights(model1), method2.delta_weights(model2)
    assert any(d.abs().max() > 0 for d in d1.values())
    for name in d1:
        assert torch.equal(d1[name], d2[name]), name
    layers = method1.adapted_layers(model1)
    first, second = list(layers.values())[:2]
    assert not torch.equal(first.basis_a.materialize()[0, :, :8], second.basis_a.materialize()[0, :, :8])

    other = copy.deepcopy(t.ctx)
    other.seed = 1
    layer_other = method1.make_layer("x", nn.Linear(32, 32), other)
    layer_same = method1.make_layer("x", nn.Linear(32, 32), t.ctx)
    assert not torch.equal(layer_other.basis_a.materialize(), layer_same.basis_a.materialize())
    assert not torch.equal(layer_other.A0, layer_same.A0)


def test_nola_starts_at_the_base_model_with_a_nonzero_a0():
    t = tiny("nola")
    method, model = wrapped(t)
    for layer in method.adapted_layers(model).values():
        assert layer.A0.abs().max() > 0 and layer.delta().abs().max() == 0
        bound = 1 / math.sqrt(layer.in_features)  # kaiming-uniform(a=√5)
        assert layer.A0.abs().max() <= bound
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch))


# ====================================================================================== Block-LoRA
def test_block_lora_delta_tiles_the_shared_block():
    layer = BlockLoRALinear(linear(12, 10), r=3, alpha=6.0, n_blocks=4, generator=torch.Generator().manual_seed(0))
    randomize(layer)
    assert layer.A_s.shape == (3, 3) and layer.B.shape == (10, 3)
    a_full = torch.cat([layer.A_s.detach()] * 4, dim=1)  # (r, n) = [A_s, A_s, A_s, A_s]
    torch.testing.assert_close(layer.delta().detach(), 2.0 * layer.B.detach() @ a_full)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight(), layer.bias()), rtol=1e-5, atol=1e-6)


def test_block_lora_with_one_block_trains_exactly_like_lora():
    """k = 1: from the same A and B, five AdamW steps of PEFT's LoRA and of Block-LoRA give the same ΔW."""
    base = one_layer_model(16, 12)
    ctx = WrapContext(seed=0)
    lora = LoRA(lr=1e-2, target_modules=["fc"], r=4, alpha=8)
    block = BlockLoRA(lr=1e-2, target_modules=["fc"], r=4, alpha=8, n_blocks=1)
    m_lora = lora.prepare(copy.deepcopy(base), ctx)
    m_block = block.prepare(copy.deepcopy(base), ctx)
    peft_layer = lora.lora_layers(m_lora)["fc"]
    layer = block.adapted_layers(m_block)["fc"]
    with torch.no_grad():
        layer.A_s.copy_(peft_layer.lora_A["default"].weight)
        peft_layer.lora_B["default"].weight.normal_(std=0.1)  # a non-zero B so that A trains from step one
        layer.B.copy_(peft_layer.lora_B["default"].weight)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    for model, method in ((m_lora, lora), (m_block, block)):
        opt = method.make_optimizer(model)
        for _ in range(5):
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(block.delta_weights(m_block)["fc"], lora.delta_weights(m_lora)["fc"],
                               rtol=1e-4, atol=1e-6)
    assert block.expected_trainable(copy.deepcopy(base), ctx) == lora.expected_trainable(copy.deepcopy(base), ctx)


def test_block_lora_counts_r_times_m_plus_n_over_k():
    method = BlockLoRA(lr=1e-3, r=2, n_blocks=4)
    assert method.layer_trainable(nn.Linear(32, 64)) == 2 * (64 + 32 // 4)


def test_block_lora_rejects_a_block_count_that_does_not_divide_the_input():
    t = tiny("block_lora", extra=["method.n_blocks=5"])
    with pytest.raises(ValueError, match=r"n_blocks=5 does not divide in_features=\d+ of layer"):
        wrapped(t)


# =========================================================================================== Hydra
@pytest.mark.parametrize("base_bias", [True, False])
@pytest.mark.parametrize("adapter_bias", [True, False])
def test_hydra_merged_layer_equals_both_branches(base_bias, adapter_bias):
    layer = HydraLinear(linear(12, 10, bias=base_bias), r_par=2, r_seq=3, scale=0.7, adapter_bias=adapter_bias,
                        init_std=0.02, generator=torch.Generator().manual_seed(0))
    randomize(layer)
    x = torch.randn(3, 4, 12)
    h = layer.base(x)
    ap, bp, as_, bs = layer.A_p, layer.B_p, layer.A_s, layer.B_s
    par = x @ ap.T @ bp.T + ((layer.a_p @ bp.T + layer.b_p) if adapter_bias else 0)
    seq = h @ as_.T @ bs.T + ((layer.a_s @ bs.T + layer.b_s) if adapter_bias else 0)
    torch.testing.assert_close(layer(x), h + 0.7 * (par + seq), rtol=1e-5, atol=1e-6)
    merged = layer.merged()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-6)
    # the merge rule of the reference's `reparameterize`: W' = W0 + s(B_pA_p + B_sA_s W0), b' = b + s·B_sA_s·b + …
    w0 = layer.base.weight
    torch.testing.assert_close(merged.weight, w0 + 0.7 * (bp @ ap + bs @ as_ @ w0), rtol=1e-5, atol=1e-6)
    assert (merged.bias is not None) == (base_bias or adapter_bias)


def test_hydra_initialisation_follows_the_reference():
    layer = HydraLinear(linear(384, 384), r_par=4, r_seq=8, scale=1.0, adapter_bias=True, init_std=0.02,
                        generator=torch.Generator().manual_seed(0))
    assert abs(torch.cat([layer.A_p.flatten(), layer.A_s.flatten()]).std().item() - 0.02) < 0.001
    for zero in (layer.B_p, layer.B_s, layer.a_p, layer.b_p, layer.a_s, layer.b_s):
        assert zero.abs().max() == 0
    x = torch.randn(2, 384)
    torch.testing.assert_close(layer(x), layer.base(x))


def test_hydra_trainable_count_formula():
    method = Hydra(lr=1e-3, r_par=4, r_seq=8)
    m, n = 64, 32
    assert method.layer_trainable(nn.Linear(n, m)) == 4 * (n + m) + 8 * 2 * m + 4 + m + 8 + m
    assert Hydra(lr=1e-3, r_par=4, r_seq=8, adapter_bias=False).layer_trainable(nn.Linear(n, m)) == 4 * (n + m) + 16 * m


# ============================================================================================ WaRA
def haar_matrix(n: int) -> torch.Tensor:
    """The orthonormal one-level Haar DWT as a dense n×n matrix: rows 0..n/2−1 low-pass, n/2..n−1 high-pass."""
    h = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n // 2):
        h[i, 2 * i] = h[i, 2 * i + 1] = math.sqrt(0.5)
        h[n // 2 + i, 2 * i], h[n // 2 + i, 2 * i + 1] = math.sqrt(0.5), -math.sqrt(0.5)
    return h


def wara_layer(n: int = 12, m: int = 10, r: int = 2) -> WaRALinear:
    layer = WaRALinear(linear(n, m), r=r, alpha=3.0, generator=torch.Generator().manual_seed(0)).double()
    randomize(layer)
    return layer


def test_wara_explicit_delta_equals_the_forward_on_the_identity():
    layer = wara_layer()
    eye = torch.eye(12, dtype=torch.float64)
    with torch.no_grad():
        from_forward = (layer(eye) - layer.base(eye)).T  # (m, n): column j is ΔW·e_j
        torch.testing.assert_close(layer.delta(), from_forward, rtol=1e-12, atol=1e-12)
        x = torch.randn(3, 5, 12, dtype=torch.float64)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight(), layer.bias()))


def test_wara_delta_is_the_haar_sandwich_and_has_rank_at_most_2r():
    layer = wara_layer(n=16, m=12, r=2)
    h_n, h_m = haar_matrix(16), haar_matrix(12)
    torch.testing.assert_close(h_n @ h_n.T, torch.eye(16, dtype=torch.float64))
    with torch.no_grad():
        core = layer.scaling * layer.B_w @ layer.A_w  # (m/2, n/2)
        expected = h_m.T @ torch.block_diag(core, core) @ h_n  # H_mᵀ (I₂ ⊗ s B_w A_w) H_n
        delta = layer.delta()
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(delta) == 2 * 2  # generic factors reach the bound 2r


def test_wara_haar_filters_cancel_into_an_even_odd_split():
    """Finding: one level with one shared adapter makes ΔW act as M on even→even and odd→odd indices, nothing else."""
    layer = wara_layer(n=16, m=12, r=2)
    with torch.no_grad():
        core, delta = layer.scaling * layer.B_w @ layer.A_w, layer.delta()
    torch.testing.assert_close(delta[0::2, 0::2], core, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta[1::2, 1::2], core, rtol=1e-12, atol=1e-12)
    assert delta[0::2, 1::2].abs().max() < 1e-12 and delta[1::2, 0::2].abs().max() < 1e-12


def test_wara_token_axis_transform_cancels():
    """The paper's 2-D version (DWT over features and tokens, the adapter on the four subbands, 2-D IDWT) equals ΔW·X."""
    layer = wara_layer(n=16, m=12, r=2)
    x = torch.randn(16, 6, dtype=torch.float64)  # X ∈ R^{n × tokens}, an even number of tokens
    h_n, h_m, h_t = haar_matrix(16), haar_matrix(12), haar_matrix(6)
    with torch.no_grad():
        core = layer.scaling * layer.B_w @ layer.A_w  # (m/2, n/2)
        c = h_n @ x @ h_t.T  # the four subbands [[LL, LH], [HL, HH]], each (n/2, T/2)
        coded = torch.block_diag(core, core) @ c  # the shared adapter on every subband: (m, T)
        two_d = h_m.T @ coded @ h_t  # 2-D IDWT: (m, T)
        torch.testing.assert_close(two_d, layer.delta() @ x, rtol=1e-12, atol=1e-12)


def test_wara_counts_half_of_lora_and_rejects_odd_sizes():
    assert WaRA(lr=1e-3, r=8).layer_trainable(nn.Linear(384, 1536)) == 8 * (1536 + 384) // 2
    method = WaRA(lr=1e-3, target_modules=["fc"], r=2)
    with pytest.raises(ValueError, match="odd in_features=5"):
        method.prepare(one_layer_model(5, 4), WrapContext())


def test_nola_stored_bases_give_the_same_layer_output_and_gradients():
    """store_bases=True keeps the very bases the regenerating path redraws: same output, same coefficient gradients."""
    regen = nola_layer()
    randomize(regen)
    stored = NOLALinear(copy.deepcopy(regen.base), regen.r, regen.scaling * regen.r, regen.basis_a.count,
                        regen.basis_b.count, seed=regen.seed, store_bases=True)
    stored.load_state_dict(regen.state_dict())
    assert "stored_a" not in stored.state_dict(), "the kept bases are regenerated, never saved"
    x, w = torch.randn(5, 12), torch.randn(5, 10)
    for layer in (regen, stored):
        (layer(x) * w).sum().backward()
    torch.testing.assert_close(stored(x), regen(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored.alpha.grad, regen.alpha.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stored.beta.grad, regen.beta.grad, rtol=1e-5, atol=1e-6)


def test_a_key_added_later_keeps_earlier_cells_at_its_old_value():
    """method.store_bases (bench.run.KEYS_ADDED_LATER): at false, NOLA's cell key is the one its records were made
    under before the key existed; set to true, it is a new cell."""
    from omegaconf import OmegaConf

    from bench.run import cell_key
    from tests.helpers import compose_cfg

    names = {"method": "nola", "task": "glue/sst2", "model": "minilm"}
    cfg = compose_cfg(["method=nola"])
    before = OmegaConf.to_container(cfg, resolve=False)
    del before["method"]["store_bases"]  # the config as it was before the key was added
    assert cell_key(OmegaConf.create(before), names) == cell_key(cfg, names)
    stored = compose_cfg(["method=nola", "method.store_bases=true"])
    assert cell_key(stored, names) != cell_key(cfg, names)
