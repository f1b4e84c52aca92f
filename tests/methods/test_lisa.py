"""LISA's and OwLore's properties (specs/methods.md, group D): only the active blocks receive gradients and blocks
never drawn stay bit-identical; a new set is drawn exactly every K steps, uniformly for LISA and ∝ p for OwLore;
the optimizer state follows the active set (dropped or kept); OwLore's outlier ratio is OWL's; a resumed run
draws the same sets and ends where an uninterrupted one does."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bench.train import Trainer, train
from methods.galore import GaLoreAdamW
from methods.lisa import LISA, BlockSampler, OwLore, find_blocks, input_feature_norms, outlier_ratio
from tests.helpers import logits, tiny, wrapped
from tests.methods.resume import resume_matches_uninterrupted

SIX = ["model.random_config.num_hidden_layers=6"]


def setup(name: str = "lisa", extra: list[str] | None = None):
    t = tiny(name, extra=[*SIX, *(extra or [])])
    method, model = wrapped(t)
    return t, method, model


def cfg(steps: int, every: int = 0) -> SimpleNamespace:
    return SimpleNamespace(max_steps=steps, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                           log_every=1, eval_every=0, checkpoint_every=every)


def block_params(model: nn.Module, i: int) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.startswith(f"bert.encoder.layer.{i}.")}


# ----------------------------------------------------------------------------------------- blocks
def test_blocks_are_the_longest_module_list_of_a_bert_and_a_llama_and_bad_input_names_the_key():
    t = tiny("lisa", extra=SIX)
    path, blocks = find_blocks(t.base, t.ctx.head_modules)
    assert path == "bert.encoder.layer" and len(blocks) == 6
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    path, blocks = find_blocks(llama)
    assert path == "model.layers" and len(blocks) == 3
    with pytest.raises(ValueError, match="method.blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    twins = nn.Module()
    twins.a, twins.b = nn.ModuleList([nn.Linear(2, 2)] * 2), nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="several block lists.*method.blocks"):
        find_blocks(twins)
    assert find_blocks(twins, path="b")[0] == "b"
    with pytest.raises(ValueError, match="method.gamma"):
        LISA(lr=1e-3, gamma=7).prepare(copy.deepcopy(t.base), t.ctx)


# ----------------------------------------------------------------------------------------- LISA
def test_only_active_blocks_get_gradients_and_blocks_never_drawn_stay_bit_identical():
    """K = 3 over 12 steps: a draw exactly after steps 3, 6, 9, 12; at every step the gradients exist for the
    active blocks (and the embeddings and head) only; blocks never active are bit-identical at the end."""
    t, method, model = setup(extra=["method.gamma=1", "method.interval_steps=3"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen, rebuilds = [], []
    after_backward, step_end = method.on_after_backward, method.on_step_end

    def check_grads(m: nn.Module, step: int) -> None:
        for i in range(6):
            has = {p.grad is not None for p in block_params(m, i).values()}
            assert has == {i in method.active}, (step, i, method.active)
        assert m.bert.embeddings.word_embeddings.weight.grad is not None
        assert all(p.grad is not None for p in m.classifier.parameters())
        seen.append(list(method.active))
        after_backward(m, step)

    def record(m: nn.Module, step: int, opt: torch.optim.Optimizer) -> bool:
        out = step_end(m, step, opt)
        rebuilds.append(out)
        return out

    method.on_after_backward, method.on_step_end = check_grads, record
    train(model, method, t.loader, cfg(12), torch.device("cpu"), None, lambda m: {}, progress=False)
    assert rebuilds == [(s + 1) % 3 == 0 for s in range(12)]
    periods = [seen[k:k + 3] for k in range(0, 12, 3)]
    assert all(p[0] == p[1] == p[2] for p in periods), "the active set changed inside a period"
    trained = {i for p in periods for i in p[0]}
    assert len({tuple(p[0]) for p in periods}) > 1, "four draws of 1 of 6 blocks were all the same"
    now = dict(model.named_parameters())
    for i in range(6):
        same = all(torch.equal(now[n], before[n]) for n in block_params(model, i))
        assert same == (i not in trained), (i, trained)
    emb = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(now[emb], before[emb])


def test_draws_are_uniform_over_subsets():
    sampler = BlockSampler(6, 2, seed=0)
    draws = [tuple(sampler.draw()) for _ in range(6000)]
    subsets = list(itertools.combinations(range(6), 2))
    counts = [draws.count(s) for s in subsets]
    assert sum(counts) == 6000  # every draw is a sorted 2-subset of distinct blocks
    assert chisquare(counts).pvalue > 1e-3, counts


@pytest.mark.parametrize("keep", [False, True])
def test_optimizer_state_follows_the_active_blocks(keep: bool):
    """Adam's step count of an active block's weight: dropped on deactivation it counts the steps since the block
    was last drawn (consecutive draws keep it); kept (LMFlow's callback), it counts every step the block was active."""
    t, method, model = setup(extra=["method.gamma=2", "method.interval_steps=1", f"method.keep_inactive_state={keep}"])
    trainer = Trainer(model, method, t.loader, cfg(30), torch.device("cpu"), None)
    total, run = [0] * 6, [0] * 6
    for _ in range(30):
        active = list(method.active)
        trainer.step()
        for i in range(6):
            total[i] += i in active
            run[i] = run[i] + 1 if i in active else 0
        params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        for i in range(6):
            for p in block_params(model, i).values():
                assert (id(p) in params) == (i in method.active)
        for i in active:
            if i in method.active:  # drawn again: its state survived the rebuild
                w = model.bert.encoder.layer[i].attention.self.query.weight
                assert int(trainer.optimizer.state[w]["step"]) == (total[i] if keep else run[i])
        state_ids = {id(p) for p in trainer.optimizer.state}
        assert state_ids <= params
    assert len(method._stash) > 0 if keep else not method._stash


# ----------------------------------------------------------------------------------------- OwLore
def test_owlore_draws_follow_p():
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05, 0.0], dtype=torch.float64)
    one = BlockSampler(6, 1, seed=1)
    one.set_probs(p * 7)  # any positive scale
    counts = torch.bincount(torch.tensor([one.draw()[0] for _ in range(8000)]), minlength=6)
    assert counts[5] == 0
    assert chisquare(counts[:5].numpy(), 8000 * p[:5].numpy()).pvalue > 1e-3, counts
    # γ = 2: numpy.random.choice's successive sampling, P(i ∈ S) = p_i + Σ_{j≠i} p_j·p_i/(1 − p_j)
    two = BlockSampler(6, 2, seed=2)
    two.set_probs(p)
    n = 8000
    hits = torch.zeros(6)
    for _ in range(n):
        hits[two.draw()] += 1
    expected = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(6) if j != i) for i in range(6)])
    assert torch.allclose(hits / n, expected.float(), atol=4 * (0.25 / n) ** 0.5), (hits / n, expected)
    with pytest.raises(ValueError, match="method.gamma"):
        BlockSampler(3, 2, seed=0).set_probs(torch.tensor([1.0, 0.0, 0.0]))


def test_outlier_ratio_pools_the_scores_of_a_block_against_m_times_their_mean():
    """Hand-built block: two linears with all-ones inputs norms but for one feature. Scores |W|·‖X‖ pooled over both
    layers: 16 + 8 entries."""
    w1 = torch.ones(4, 4)
    w1[0, 0] = 100.0  # one weight outlier
    w2 = torch.ones(2, 4) * 0.5
    x1 = torch.ones(4)
    x2 = torch.tensor([1.0, 1.0, 1.0, 40.0])  # one activation outlier: column 3 of w2 scores 20
    # pooled scores: 15 ones + 100, 6 halves + 2 × 20; mean = (15 + 100 + 3 + 40) / 24 = 6.583
    assert outlier_ratio([w1, w2], [x1, x2], threshold=13.0) == pytest.approx(1 / 24)  # only 100 > 85.6
    assert outlier_ratio([w1, w2], [x1, x2], threshold=3.0) == pytest.approx(3 / 24)  # 100, 20, 20 > 19.75
    # the mean is the block's, not each layer's: at M = 3.5 the 20s are outliers of w2 alone (mean 5.375) only
    assert outlier_ratio([w1, w2], [x1, x2], threshold=3.5) == pytest.approx(1 / 24)  # 20 < 23.04
    assert outlier_ratio([w2], [x2], threshold=3.5) == pytest.approx(2 / 8)  # 20 > 18.8
    assert outlier_ratio([-w1], [x1], threshold=13.0) == pytest.approx(1 / 16)  # |W|


def test_input_feature_norms_count_only_real_tokens():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(3, 2)])

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **_: object) -> torch.Tensor:
            return self.blocks[0](inputs_embeds)

    x = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [100.0, 100.0, 100.0]],
                      [[0.0, 1.0, 1.0], [50.0, 50.0, 50.0], [60.0, 60.0, 60.0]]])  # (2, 3, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    toy = Toy().train()
    norms = input_feature_norms(toy, {"0": toy.blocks[0]}, [{"inputs_embeds": x, "attention_mask": mask}])
    real = torch.stack([x[0, 0], x[0, 1], x[1, 0]])  # (3, 3)
    torch.testing.assert_close(norms["0"], real.norm(dim=0))
    assert toy.training, "the model's mode was not restored"
    with pytest.raises(ValueError, match="calibration_batches"):
        input_feature_norms(toy, {"0": toy.blocks[0]}, [])


def test_owlore_calibrates_p_from_outlier_ratios_and_projects_the_active_blocks_with_galore():
    t, method, model = setup("owlore", extra=["method.outlier_threshold=3", "method.gamma=2", "method.r=4"])
    assert isinstance(method, OwLore)
    ratios = torch.tensor(method.outlier_ratios, dtype=torch.float64)
    assert len(ratios) == 6 and ratios.sum() > 0
    torch.testing.assert_close(method._sampler.probs, ratios / ratios.sum())
    assert len(method.active) == 2
    opt = method.make_optimizer(model)
    assert isinstance(opt, GaLoreAdamW)
    projected = {id(p) for g in opt.param_groups if g.get("rank") is not None for p in g["params"]}
    expected = {id(model.get_submodule(n).weight) for n in method._targets
                if any(n.startswith(f"bert.encoder.layer.{i}.") for i in method.active)}
    assert projected == expected and len(expected) == 2 * 6  # q, k, v, attn-out, intermediate, output per block
    model(**t.batch).loss.backward()
    opt.step()
    w = model.bert.encoder.layer[method.active[0]].attention.self.query.weight
    assert opt.state[w]["exp_avg"].shape == (64, 4)  # GaLore's m×r state (m ≥ n: right projection)


def test_owlore_with_no_outliers_samples_uniformly():
    t, method, model = setup("owlore", extra=["method.outlier_threshold=1e6"])
    assert sum(method.outlier_ratios) == 0
    torch.testing.assert_close(method._sampler.probs, torch.full((6,), 1 / 6, dtype=torch.float64))
    assert len(method.active) == 1


# ----------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name,extra", [("lisa", ["method.interval_steps=2", "method.keep_inactive_state=true"]),
                                        ("owlore", ["method.interval_steps=2", "method.outlier_threshold=3",
                                                    "method.r=4", "method.update_proj_gap=3"])])
def test_resumed_run_draws_the_same_blocks_and_ends_where_an_uninterrupted_one_does(name, extra, tmp_path: Path):
    extra = [*SIX, *extra]
    (method, model), (method2, model2) = resume_matches_uninterrupted(name, extra, tmp_path, steps=9, every=3,
                                                                      die_after=5, warmup_ratio=0.0, weight_decay=0.0)
    assert method2.active == method.active
    batch = tiny(name, extra=extra).batch
    torch.testing.assert_close(logits(model2, batch), logits(model, batch), rtol=0, atol=0)
