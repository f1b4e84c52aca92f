"""Adapter merging (tasks/merge.py, bench/merge.py): the mergers' arithmetic on hand-made task vectors, the reading
of a member's saved tensors, and merge cells end to end on a tiny BERT whose members train as ordinary cells."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.merge import lora_factors, member_overrides, plain_name
from bench.run import ConfigError, cell_key, cell_names, run
from tasks.merge import MERGERS, MergeTask, merge_tensors
from tests.helpers import compose_cfg


def vec(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


# ------------------------------------------------------------------------------------------- mergers


def test_average_and_task_arithmetic_are_weighted_sums():
    a, b = vec(1.0, -2.0, 4.0), vec(3.0, 2.0, 0.0)
    assert torch.allclose(merge_tensors([a, b], "average", None, None)["w"], torch.tensor([2.0, 0.0, 2.0]))
    assert torch.allclose(merge_tensors([a, b], "task_arithmetic", 0.5, None)["w"], torch.tensor([2.0, 0.0, 2.0]))
    assert torch.allclose(merge_tensors([a, a], "average", None, None)["w"], a["w"])


def test_ties_elects_a_sign_and_averages_only_the_agreeing_entries():
    a, b = vec(3.0, -1.0, 0.1), vec(-2.0, -2.0, 0.2)
    # no trimming: signs of the sums (+, −, +); entry 0 keeps a alone, entry 1 the mean of both, entry 2 both
    merged = merge_tensors([a, b], "ties", 2.0, 1.0)["w"]
    assert torch.allclose(merged, 2.0 * torch.tensor([3.0, -1.5, 0.15]))
    # density 1/3 keeps each member's largest entry only: a's 3 and b's −2 (a tie at |−2| keeps one of b's)
    trimmed = merge_tensors([vec(3.0, -1.0, 0.1), vec(-2.0, 0.5, 0.2)], "ties", 1.0, 1 / 3)["w"]
    assert torch.allclose(trimmed, torch.tensor([3.0, 0.0, 0.0]))
    # "frequency": the majority of signs, not the sign of the sum
    votes = merge_tensors([vec(-10.0), vec(1.0), vec(1.0)], "ties", 1.0, 1.0, sign="frequency")["w"]
    assert torch.allclose(votes, torch.tensor([1.0]))


def test_dare_drops_at_the_density_rescales_and_is_seeded():
    tau = {"w": torch.ones(20000)}
    merged = merge_tensors([tau], "dare_linear", 1.0, 0.1, seed=3)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01  # 90% dropped
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 10.0))  # survivors rescaled by 1/density
    assert torch.equal(merged, merge_tensors([tau], "dare_linear", 1.0, 0.1, seed=3)["w"])
    assert not torch.equal(merged, merge_tensors([tau], "dare_linear", 1.0, 0.1, seed=4)["w"])
    state = torch.random.get_rng_state()
    merge_tensors([tau], "dare_ties", 1.0, 0.1, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is left as it was


def test_a_tensor_one_member_did_not_train_counts_as_zero():
    merged = merge_tensors([{"w": torch.ones(2), "bias": torch.ones(2)}, {"w": torch.ones(2)}], "average", None, None)
    assert torch.allclose(merged["bias"], torch.full((2,), 0.5)) and torch.allclose(merged["w"], torch.ones(2))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"members": ["glue/sst2"]}, "at least two"),
    ({"members": ["glue/sst2", "glue/sst2"]}, "at least two different"),
    ({"merger": "sum"}, "unknown task.merger"),
    ({"merger": "average", "scale": 0.5}, "task.scale=null"),
    ({"merger": "ties", "density": 1.5}, r"task.density must be in \(0, 1\]"),
    ({"merger": "average", "density": 0.5}, "TIES's and DARE's"),
    ({"merger": "ties", "clusters": 4}, "LoRA-LEGO's k"),
])
def test_bad_merge_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeTask(**{"members": ["glue/sst2", "glue/mrpc"], **kwargs})


def test_defaults_come_from_the_papers_and_other_task_keys_go_to_the_members():
    task = MergeTask(["glue/sst2", "glue/mrpc"], merger="ties", max_train_samples=64, max_eval_samples=None)
    assert (task.scale, task.density) == (1.0, 0.2)
    assert task.member_overrides == ["task.max_eval_samples=null", "task.max_train_samples=64"]
    assert set(MERGERS) >= {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "lora_lego"}


# ------------------------------------------------------------------------------------------- reading members


def test_member_overrides_replace_every_task_key():
    merged = ["task=merge/glue", "method=lora", "task.merger=ties", "+task.x=1", "train.max_steps=5"]
    assert member_overrides(merged, "glue/rte", ["task.max_train_samples=8"]) == [
        "method=lora", "train.max_steps=5", "task=glue/rte", "task.max_train_samples=8"]


def test_saved_names_map_onto_the_plain_model():
    assert plain_name("base_model.model.classifier.modules_to_save.default.weight") == "classifier.weight"
    assert plain_name("base_model.model.classifier.original_module.weight") is None
    assert plain_name("bert.encoder.layer.0.output.dense.bias") == "bert.encoder.layer.0.output.dense.bias"


def test_lora_factors_fit_the_scaling_and_skip_what_is_not_a_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    p = "base_model.model."
    adapter = {f"{p}l1.lora_A.default.weight": a, f"{p}l1.lora_B.default.weight": b,
               f"{p}l2.lora_A.default.weight": a, f"{p}l2.lora_B.default.weight": b}
    deltas = {"l1": 4.0 * b @ a, "l2": 4.0 * b @ a + 0.1 * torch.randn(6, 5, generator=g)}  # l2: DoRA-like
    factors = lora_factors(adapter, deltas)
    assert set(factors) == {"l1"}
    sb, aa = factors["l1"]
    assert torch.allclose(sb @ aa, deltas["l1"], atol=1e-5)


# ------------------------------------------------------------------------------------------- end to end

SMOKE = ["model=tiny_bert", "+experiment=smoke", "task.members=[glue/sst2,glue/mrpc]", "progress=false"]


@pytest.fixture(scope="module")
def merged_cells(tmp_path_factory):
    """Two merge cells over one pair of members per method: TIES first (it trains the members), then averaging."""
    out = {}
    for method in ("lora", "full"):
        results = tmp_path_factory.mktemp(method)
        ties = run(compose_cfg([f"method={method}", "task=merge/glue", *SMOKE, f"results_dir={results}"]))
        average = run(compose_cfg([f"method={method}", "task=merge/glue", *SMOKE, f"results_dir={results}",
                                   "task.merger=average"]))
        out[method] = (results, ties, average)
    return out


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_merge_cell_trains_its_members_as_plain_cells_and_scores_every_member(merged_cells, method):
    results, ties, average = merged_cells[method]
    assert ties["status"] == "completed", ties["error"]
    assert ties["task"] == "merge/glue/ties" and average["task"] == "merge/glue/average"
    for member, info in ties["members"].items():
        # the member is the cell a plain run of that task gives: same run id, so a plain run skips it
        direct = compose_cfg([f"method={method}", f"task={member}", "model=tiny_bert", "+experiment=smoke",
                              f"results_dir={results}"])
        assert info["cell_key"] == cell_key(direct, cell_names(direct))
        assert run(direct).get("skipped") is True
        record = json.loads((results / "runs" / info["run_id"] / "record.json").read_text())
        assert record["attempts"] == 1  # the second merge cell reused it
        assert info["rebuilt"] == pytest.approx(info["recorded"], abs=1e-6)  # θ_0 + τ_t is the trained model
        main = record["main_metric"]
        m = ties["metrics"]
        assert m[f"{member}/individual"] == info["rebuilt"]
        if info["rebuilt"] > 0:
            assert m[f"{member}/normalized"] == pytest.approx(m[f"{member}/{main}"] / info["rebuilt"])
        else:  # a member that learnt nothing (an F1 of 0 after a few steps) has no ratio
            assert math.isnan(m[f"{member}/normalized"])
    ratios = [ties["metrics"][f"{t}/normalized"] for t in ties["members"]]
    ratios = [r for r in ratios if not math.isnan(r)]  # the average is over the members that have a ratio
    assert ties["metrics"]["normalized_members"] == len(ratios)
    assert ties["metrics"]["normalized_avg"] == pytest.approx(sum(ratios) / len(ratios) if ratios else math.nan,
                                                              nan_ok=True)
    assert ties["main_metric"] == "normalized_avg" and ties["merge"]["density"] == 0.2
    assert average["merge"]["merger"] == "average" and average["id"] != ties["id"]


def test_full_fine_tuning_merges_every_backbone_tensor_it_trained(merged_cells):
    _, ties, _ = merged_cells["full"]
    lora = merged_cells["lora"][1]
    # full fine-tuning also trains biases, norms and embeddings: more tensors per task vector than LoRA's ΔW
    assert all(ties["members"][t]["tensors"] > lora["members"][t]["tensors"] for t in ties["members"])
    assert all(info["lora_factors"] == 0 for info in ties["members"].values())
    assert all(info["lora_factors"] == info["tensors"] for info in lora["members"].values())


def test_lego_merges_trained_loras_at_their_rank(merged_cells):
    results = merged_cells["lora"][0]
    lego = run(compose_cfg(["method=lora", "task=merge/glue", *SMOKE, f"results_dir={results}",
                            "task.merger=lora_lego"]))
    assert lego["status"] == "completed" and lego["task"] == "merge/glue/lora_lego"
    layers = next(iter(lego["members"].values()))["lora_factors"]
    rank = lego["config"]["method"]["r"]
    assert lego["merge"]["lego_rank_total"] == layers * rank  # k = the members' rank in every layer
    assert lego["merge"]["lego_units_from"] == {"lora factors": 2 * layers, "svd of ΔW": 0}
    assert all(math.isfinite(lego["metrics"][f"{t}/individual"]) for t in lego["members"])


def test_a_merge_cell_reruns_as_a_skip(merged_cells):
    results, ties, _ = merged_cells["lora"]
    again = run(compose_cfg(["method=lora", "task=merge/glue", *SMOKE, f"results_dir={results}"]))
    assert again.get("skipped") is True and again["id"] == ties["id"]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="cannot be merged"):
        run(compose_cfg(["method=smora", "task=merge/glue", *SMOKE, f"results_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="member glue/sst9 cannot be composed"):
        run(compose_cfg(["method=lora", "task=merge/glue", *SMOKE[:2], "task.members=[glue/sst2,glue/sst9]",
                         f"results_dir={tmp_path}"]))


# ------------------------------------------------------------------------------------------- LoRA-LEGO


def lora(seed: int, m: int = 12, n: int = 10, r: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def test_lego_with_one_cluster_per_unit_is_the_sum_of_the_members():
    """Concatenation-summation equivalence: k = every unit leaves each centroid a member's own unit."""
    (b1, a1), (b2, a2) = lora(0), lora(1)
    vectors = [{"l.weight": b1 @ a1}, {"l.weight": b2 @ a2}]
    merged, info = MergeTask(["glue/sst2", "glue/mrpc"], merger="lora_lego", clusters=6).merge(
        vectors, [{"l": (b1, a1)}, {"l": (b2, a2)}])
    r, k = 3, 6
    assert torch.allclose(merged["l.weight"], (b1 @ a1 + b2 @ a2) * (r / k) ** 0.5, atol=1e-4)
    assert info["lego_rank_total"] == 6 and info["lego_units_from"] == {"lora factors": 2, "svd of ΔW": 0}


def test_lego_of_identical_members_is_that_member_and_where_the_scale_sits_does_not_matter():
    b, a = lora(2)
    task = MergeTask(["glue/sst2", "glue/mrpc"], merger="lora_lego")
    merged, _ = task.merge([{"l.weight": b @ a}] * 2, [{"l": (b, a)}, {"l": (4.0 * b, a / 4.0)}])
    assert torch.allclose(merged["l.weight"], b @ a, atol=1e-4)  # k = r: each cluster holds the same unit twice


def test_lego_keeps_the_rank_at_k_rescales_centroids_and_refuses_full_rank_updates():
    (b1, a1), (b2, a2) = lora(3), lora(4)
    vectors = [{"l.weight": b1 @ a1, "l.bias": torch.ones(12)}, {"l.weight": b2 @ a2}]
    factors = [{"l": (b1, a1)}, {}]  # the second member saved no LoRA factors: its ΔW is factored by SVD
    merged, info = MergeTask(["glue/sst2", "glue/mrpc"], merger="lora_lego").merge(vectors, factors, seed=1)
    assert torch.linalg.matrix_rank(merged["l.weight"]).item() == 3
    assert info["lego_units_from"] == {"lora factors": 1, "svd of ΔW": 1}
    assert torch.allclose(merged["l.bias"], torch.full((12,), 0.5))  # not a matrix: averaged
    again, _ = MergeTask(["glue/sst2", "glue/mrpc"], merger="lora_lego").merge(vectors, factors, seed=1)
    assert torch.equal(merged["l.weight"], again["l.weight"])  # seeded k-means
    full = torch.randn(80, 80, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="rank 80 > 64"):
        MergeTask(["glue/sst2", "glue/mrpc"], merger="lora_lego").merge([{"l.weight": full}] * 2, [{}, {}])


def test_lego_centroids_keep_their_members_mean_norm():
    from tasks.merge import balanced_units, lego_layer

    (b1, a1), (b2, a2) = lora(6, r=2), lora(7, r=2)
    result = lego_layer([(b1, a1), (b2, a2)], 1, torch.Generator().manual_seed(0))  # all 4 units in one cluster
    units = torch.cat([balanced_units(b1, a1), balanced_units(b2, a2)])
    centroid = torch.cat([result.a[0], result.b[:, 0] / (2 / 1) ** 0.5])  # B' without the output reweighting √(r/k)
    assert centroid.norm() == pytest.approx(units.norm(dim=1).mean().item(), rel=1e-5)
    assert units.mean(dim=0).norm() < units.norm(dim=1).mean()  # the norm decay the reweighting undoes


def test_a_peft_member_has_the_run_id_a_plain_run_gives(tmp_path):
    """A method=peft member's training_params.json sets its budget (and so its run id) as in a plain run."""
    import shutil

    from bench.merge import member_cell
    from bench.run import apply_training_params, run_id_of

    folder = tmp_path / "peft"
    shutil.copytree("examples/peft/lora/rank8", folder)
    (folder / "training_params.json").write_text(json.dumps({"max_steps": 7, "optimizer_kwargs": {"lr": 3e-4}}))
    overrides = ["method=peft", f"method.config={folder}", "task=glue/rte", "model=tiny_bert"]
    member = member_cell("glue/rte", overrides)
    cfg = compose_cfg(overrides)  # the running app's overrides are these
    apply_training_params(cfg)
    names = cell_names(cfg)
    assert member.cfg.train.max_steps == 7 and member.cfg.method.lr == 3e-4
    assert member.run_id == run_id_of(names, cfg.seed, cell_key(cfg, names))
