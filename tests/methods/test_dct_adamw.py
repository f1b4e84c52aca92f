"""DCT-AdamW's properties (SVD-free GaLore, arXiv 2505.17967): the update lies in the DCT columns chosen by their
alignment with the gradient, no SVD is ever taken, the per-weight state is r indices plus m×r (or r×n) moments, the
state resumes exactly, and a refresh costs less than GaLore's SVD (measured side by side)."""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import scipy.fft
import torch

from bench.train import optimizer_state_bytes
from methods.galore import GaLoreAdamW, dct_basis, projects_right
from tests.helpers import tiny, train_steps, wrapped


def setup(extra: list[str] | None = None, dtype: torch.dtype = torch.float32):
    t = tiny("dct_adamw", extra=["method.update_proj_gap=2", *(extra or [])])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx).to(dtype)
    model.eval()  # no dropout: the same gradients in every run
    return t, method, model, method.make_optimizer(model), [t.batch, *t.calibration]


def test_basis_is_the_orthonormal_dct_ii():
    q = dct_basis(48, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(q.mT @ q, torch.eye(48, dtype=torch.float64), atol=1e-12, rtol=0)
    reference = torch.from_numpy(scipy.fft.dct(torch.eye(48).double().numpy(), type=2, norm="ortho", axis=0))
    torch.testing.assert_close(q.mT, reference, atol=1e-12, rtol=0)  # Qᵀx is scipy's orthonormal DCT-II of x


def test_update_lies_in_the_chosen_columns_and_they_are_the_most_aligned():
    t, method, model, optimizer, batches = setup(dtype=torch.float64)
    weights = {n: model.get_submodule(n).weight for n in method._targets}
    sides = set()
    for i, batch in enumerate(batches[:4]):  # T = 2: the columns are chosen at steps 0 and 2
        before = {n: w.detach().clone() for n, w in weights.items()}
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads = {n: w.grad.detach().clone() for n, w in weights.items()}
        optimizer.step()
        for name, w in weights.items():
            state = optimizer.state[w]
            right = projects_right(w.shape)
            sides.add(right)
            q = dct_basis(w.shape[1] if right else w.shape[0], torch.float64, w.device)
            cols = q[:, state["indices"]]  # (n, r) or (m, r)
            delta = w.detach() - before[name]
            assert delta.abs().max() > 0, f"step {i}: {name} did not move"
            in_span = delta @ cols @ cols.mT if right else cols @ cols.mT @ delta
            assert (delta - in_span).norm() <= 1e-9 * delta.norm(), f"step {i}: {name} left the chosen columns"
            if i % 2 == 0:  # chosen from this gradient: the r largest ℓ1 alignments, by brute force
                scores = (grads[name] @ q).abs().sum(0) if right else (q.mT @ grads[name]).abs().sum(1)
                best = set(torch.argsort(scores, descending=True)[:method.r].tolist())
                assert set(state["indices"].tolist()) == best
    assert sides == {True, False}, "the tiny BERT should exercise both projection sides"


def test_no_svd_is_taken(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("DCT-AdamW took a decomposition")

    for name in ("svd", "svdvals", "svd_lowrank"):
        if hasattr(torch.linalg, name):
            monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "svd", refuse)
    monkeypatch.setattr(torch, "svd_lowrank", refuse)
    t = tiny("dct_adamw", extra=["method.update_proj_gap=1"])  # a new choice of columns at every step
    method, model = wrapped(t)
    train_steps(model, method, t.loader, steps=3)


def test_state_is_indices_and_low_rank_moments_and_the_basis_is_counted_once():
    t, method, model, optimizer, batches = setup()
    optimizer.zero_grad(set_to_none=True)
    model(**batches[0]).loss.backward()
    optimizer.step()
    sizes = set()
    for name in method._targets:
        w = model.get_submodule(name).weight
        state = optimizer.state[w]
        m, n = w.shape
        r = min(method.r, m, n)
        assert "projector" not in state and state["indices"].shape == (r,)
        assert state["exp_avg"].shape == ((m, r) if m >= n else (r, n)) == state["exp_avg_sq"].shape
        sizes.add(min(m, n))
    assert sorted(b.shape[0] for b in optimizer.shared_tensors) == sorted(sizes)  # one basis per reduced size
    per_param = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
    shared = sum(b.numel() * b.element_size() for b in optimizer.shared_tensors)
    assert optimizer_state_bytes(optimizer) == per_param + shared


def test_state_dict_resumes_exactly():
    t, method, model, optimizer, batches = setup()
    for batch in batches[:2]:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    twin = copy.deepcopy(model)
    twin_opt = method.make_optimizer(twin)
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, opt in ((model, optimizer), (twin, twin_opt)):
        for batch in batches[2:4]:  # the second step re-chooses the columns (T = 2)
            opt.zero_grad(set_to_none=True)
            m(**batch).loss.backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_choosing_columns_is_faster_than_galores_svd_side_by_side():
    """Refresh at every step (T = 1) on MiniLM's target shapes; interleaved rounds, median per-round ratio."""
    torch.manual_seed(0)
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    timers = {}
    for projection in ("svd", "dct"):
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = GaLoreAdamW(params, lr=1e-4, rank=4, update_proj_gap=1, projection=projection)
        opt.step()  # warm-up (state, DCT basis)
        timers[projection] = opt
    ratios = []
    for _ in range(7):
        times = {}
        for projection, opt in timers.items():
            start = time.perf_counter()
            opt.step()
            times[projection] = time.perf_counter() - start
        ratios.append(times["dct"] / times["svd"])
    assert statistics.median(ratios) < 0.7, f"DCT step / SVD step per round: {ratios}"


def test_bad_alignment_norm_is_refused():
    from methods.galore import DCTAdamW

    with pytest.raises(ValueError, match="align_norm"):
        DCTAdamW(lr=1e-4, align_norm=0)
