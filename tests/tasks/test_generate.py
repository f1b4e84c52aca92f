"""Adapter generation (tasks/generate.py, bench/generate.py): adapters as vectors, the CVAE and its loss on
constructed cases, snapshot steps, and a generation cell end to end on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch

from bench.run import run, snapshot_steps
from tasks.generate import CVAE, Flattener, cvae_loss, generate, train_cvae
from tests.helpers import compose_cfg


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.lora_B": torch.randn(3, 2, generator=g) * 0.01, "a.lora_A": torch.randn(2, 5, generator=g) + 4.0}


def test_flattening_standardises_pools_and_round_trips():
    adapters = [adapter(0), adapter(1), adapter(2)]
    flat = Flattener(adapters, multiple=8)
    assert (flat.length, flat.padded) == (16, 16)
    xs = torch.stack([flat.flatten(a) for a in adapters])  # (3, 16)
    a_part = xs[:, :10]  # "a.lora_A" comes first in name order: pooled mean 0, std 1 over the three adapters
    assert float(a_part.mean()) == pytest.approx(0.0, abs=1e-5) and float(a_part.std()) == pytest.approx(1.0, abs=1e-4)
    back = flat.unflatten(xs[1])
    for name, t in adapters[1].items():
        torch.testing.assert_close(back[name], t)
    assert Flattener([adapter(0)], multiple=32).padded == 32  # zero-padded to the multiple
    with pytest.raises(ValueError, match="differ in tensor names or shapes"):
        Flattener([adapter(0), {"b.lora_B": torch.zeros(3, 2)}], multiple=8)


def test_kl_is_zero_at_the_prior_and_half_the_squared_mean_off_it():
    x = torch.zeros(2, 4)
    zero, log_var = torch.zeros(2, 3), torch.zeros(2, 3)
    assert float(cvae_loss(x, x, zero, log_var, 1.0)[2]) == 0.0
    assert float(cvae_loss(x, x, torch.ones(2, 3), log_var, 1.0)[2]) == pytest.approx(1.5)  # ½·Σ μ² = ½·3


def test_the_cvae_keeps_the_length_and_learns_its_condition():
    torch.manual_seed(0)
    model = CVAE(64, condition_dim=2, latent_dim=4, hidden_dim=16, channels=(4, 8))
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 64, generator=g)  # two "tasks", one adapter each
    xs, cs = targets.repeat(4, 1), torch.eye(2).repeat(4, 1)  # (8, 64), (8, 2)
    recon, mu, log_var = model(xs, cs)
    assert recon.shape == (8, 64) and mu.shape == (8, 4)
    curve = train_cvae(model, xs, cs, epochs=150, batch_size=4, lr=1e-2, beta=1e-3, seed=0)
    assert curve[-1]["mse"] < 0.5 * curve[0]["mse"]
    for task in (0, 1):  # a sample for a task's condition lies nearer that task's adapter than the other's
        sample = generate(model, torch.eye(2)[task], samples=3, seed=task).mean(0)
        assert (sample - targets[task]).norm() < (sample - targets[1 - task]).norm()


def test_snapshots_are_spread_over_the_second_half_and_end_at_the_last_step():
    assert snapshot_steps(4, 100) == [62, 75, 88, 100]
    assert snapshot_steps(0, 100) == [] and snapshot_steps(3, 6) == [4, 5, 6]


SMOKE = ["model=tiny_bert", "+experiment=smoke", "task=generate/glue", "method=lora", "task.members=[glue/sst2,glue/cola]",
         "task.held_out=[glue/rte]", "task.snapshots=2", "task.epochs=2", "task.channels=[2,4]", "task.latent_dim=4",
         "task.hidden_dim=8", "task.samples=2", "task.context_examples=32", "progress=false"]


def test_a_generation_cell_trains_its_members_with_snapshots_and_scores_every_task(tmp_path):
    record = run(compose_cfg([*SMOKE, f"results_dir={tmp_path}"]))
    assert record["status"] == "completed", record["error"]
    m = record["metrics"]
    assert record["main_metric"] == "heldout_normalized" and record["generate"]["training_adapters"] == 4
    for t in ("glue/sst2", "glue/cola", "glue/rte"):
        assert 0.0 <= m[f"{t}/generated"] <= m[f"{t}/generated_best"] <= 1.0 or t == "glue/cola"  # MCC may be < 0
        assert f"{t}/normalized" in m
    assert record["members"]["glue/rte"]["held_out"] and not record["members"]["glue/sst2"]["held_out"]
    sst2 = tmp_path / "runs" / record["members"]["glue/sst2"]["run_id"] / "snapshots"
    assert sorted(p.name for p in sst2.iterdir()) == ["step_000004.safetensors", "step_000006.safetensors"]
    rte = tmp_path / "runs" / record["members"]["glue/rte"]["run_id"]
    assert not (rte / "snapshots").exists()  # a held-out task's adapters never reach the generator
    again = run(compose_cfg([*SMOKE, f"results_dir={tmp_path}"]))
    assert again.get("skipped") is True

    from analysis.__main__ import main

    assert main(["generate", "--results", str(tmp_path)]) == 0
    report = (tmp_path / "generate.md").read_text()
    assert "| held out | glue/rte " in report and "| seen     | glue/sst2 " in report
