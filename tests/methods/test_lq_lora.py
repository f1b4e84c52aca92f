"""LQ-LoRA: the NF quantiser, the alternating decomposition (residual never rises, identity quantiser exact),
the Fisher weighting, the bit-allocation ILP, and the wrapped model's Q + s·B0·A0."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from methods.lq_lora import QuantConfig, allocate_bits, lq_decompose, nf_quantize, normal_float_codebook
from tests.helpers import logits, tiny, wrapped

# QLoRA's NF4 table (Dettmers et al., arXiv 2305.14314, appendix E; bitsandbytes' NF4 lookup)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _w(m: int = 96, n: int = 160, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)  # a strong low-rank part, as in weights
    return 0.02 * torch.randn(m, n, generator=g) + 0.05 * low


def test_nf4_codebook_is_qloras():
    torch.testing.assert_close(normal_float_codebook(4).float(), torch.tensor(NF4), rtol=0, atol=1e-6)
    for bits in (2, 3, 8):
        code = normal_float_codebook(bits)
        assert len(code) == 2 ** bits and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
        assert torch.all(code[1:] > code[:-1])


@pytest.mark.parametrize("cfg", [QuantConfig(4, 64, 8, 256), QuantConfig(2, 16, 8, 16), QuantConfig(3, 32, 8, 64)])
def test_nf_quantize_rounds_each_block_to_its_scaled_codebook(cfg):
    w = _w()
    q = nf_quantize(w, cfg)
    code = normal_float_codebook(cfg.bits).float()
    blocks_w, blocks_q = w.reshape(-1, cfg.block_size), q.reshape(-1, cfg.block_size)
    for bw, bq in zip(blocks_w[:20], blocks_q[:20]):
        scale = bq.abs().max() / code.abs().max() if bq.abs().max() > 0 else 1.0
        # every value is a codebook entry times one scale per block, and that scale is close to the block absmax
        ratios = (bq / scale)[:, None]
        assert torch.min((ratios - code[None, :]).abs(), dim=1).values.max() < 1e-4
        assert abs(float(scale) - float(bw.abs().max())) <= 0.02 * float(bw.abs().max())


def test_more_bits_give_smaller_error_and_zeros_stay_zero():
    w = _w()
    errors = [float((nf_quantize(w, QuantConfig(bits=b)) - w).norm()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05 * errors[0]
    z = w.clone()
    z[:, :64] = 0  # whole zero blocks (block_size 64 along rows of 160: not aligned, still exact 0s)
    assert torch.all(nf_quantize(z, QuantConfig())[z == 0] == 0)
    assert QuantConfig(4, 64, 8, 256, "fp32").bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_residual_never_rises_and_beats_plain_quantisation(bits):
    w, cfg = _w(), QuantConfig(bits=bits)
    res = lq_decompose(w, 8, lambda x: nf_quantize(x, cfg))
    kept = int(np.argmin(res.errors))
    assert all(a >= b for a, b in zip(res.errors[:kept], res.errors[1:kept + 1])), res.errors
    assert kept >= len(res.errors) - 2  # the loop stops at the first rise (or the cap)
    final = float((w - res.q - res.l1 @ res.l2).norm())
    assert final == pytest.approx(res.errors[kept], rel=1e-5)
    assert final < float((w - nf_quantize(w, cfg)).norm())  # the low-rank part absorbs error quantisation alone has
    assert res.l1.shape == (96, 8) and res.l2.shape == (8, 160)


def test_identity_quantiser_reconstructs_w0_exactly():
    w = _w()
    res = lq_decompose(w, 8, lambda x: x)
    torch.testing.assert_close(res.q + res.l1 @ res.l2, w, rtol=0, atol=1e-6)


def test_uniform_fisher_equals_unweighted_and_fisher_moves_error_off_important_rows():
    w, cfg = _w(), QuantConfig(bits=2, block_size=16, scale_block_size=16)
    quant = lambda x: nf_quantize(x, cfg)  # noqa: E731
    plain = lq_decompose(w, 8, quant)
    uniform = lq_decompose(w, 8, quant, fisher=torch.ones_like(w))  # F ≡ 1: the plain problem
    torch.testing.assert_close(uniform.q + uniform.l1 @ uniform.l2, plain.q + plain.l1 @ plain.l2, rtol=0, atol=0)
    f = torch.ones_like(w)
    f[:8] = 1e4  # eight rows matter far more
    weighted = lq_decompose(w, 8, quant, fisher=f)
    err = lambda r: (w - r.q - r.l1 @ r.l2)[:8].norm()  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


def test_ilp_finds_the_brute_force_optimum_within_budget():
    rng = np.random.default_rng(0)
    costs = rng.uniform(1, 10, size=(4, 3))
    storage = np.array([[2.0, 3.0, 4.0]] * 4) * rng.integers(1, 4, size=(4, 1))
    budget = 0.8 * storage.max(axis=1).sum()
    choice = allocate_bits(costs, storage, budget)
    best = min((c for c in itertools.product(range(3), repeat=4) if storage[range(4), c].sum() <= budget),
               key=lambda c: costs[range(4), c].sum())
    assert costs[range(4), choice].sum() == pytest.approx(costs[range(4), best].sum())
    assert storage[range(4), choice].sum() <= budget + 1e-9
    with pytest.raises(ValueError, match="raise method.bit_budget"):
        allocate_bits(costs, storage, 0.5 * storage.min(axis=1).sum())


def test_wrapped_model_is_q_plus_low_rank():
    t = tiny("lq_lora", extra=["method.r=8"])
    method, model = wrapped(t)
    for name, layer in method.lora_layers(model).items():
        w0 = method._w0[name]
        q = layer.get_base_layer().weight.detach()
        s = layer.scaling["default"]
        low = s * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
        assert float((w0 - q - low).norm()) < float((w0 - nf_quantize(w0, method.qconfig)).norm())
        torch.testing.assert_close(method.delta_weights(model)[name], q + low - w0, rtol=0, atol=1e-5)
    assert method.post_train(model, t.ctx)["lq_average_bits"] == pytest.approx(method.qconfig.bits_per_param)
    assert not torch.allclose(logits(model, t.batch), logits(t.base, t.batch))  # quantisation error is real


def test_identity_quantiser_starts_at_the_base_model():
    t = tiny("lq_lora", extra=["method.r=8", "method.quantizer=identity"])
    _, model = wrapped(t)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)


def test_bit_budget_is_met_and_fisher_option_runs():
    t = tiny("lq_lora", extra=["method.r=8", "method.bit_budget=3.0", "method.fisher=true", "method.fisher_samples=8",
                               "method.search_bits=[2,4]", "method.search_block_sizes=[64]",
                               "method.search_scale_block_sizes=[16]", "method.max_iterations=5"])
    method, model = wrapped(t)
    assert method.average_bits <= 3.0
    assert {c.bits for c in method.assignment.values()} == {2, 4}  # 3 bits on average: a real mix
