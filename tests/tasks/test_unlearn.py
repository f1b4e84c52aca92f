"""Unlearning (tasks/unlearn.py, bench/unlearn.py): the objectives and metrics on constructed cases with known
answers, the offline facts and their split, and a cell end to end on a tiny random Llama (teacher first)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench.run import ConfigError, run
from bench.unlearn import teacher_cell
from tasks.unlearn import (DATA, FactsTask, UnlearnTask, harmonic, inverted_hinge, load_facts, objective_loss,
                           rouge_l_recall, token_nll)
from tests.helpers import compose_cfg

# a tiny teacher and a two-step unlearning run: seconds, not minutes
TINY = ["model=tiny_llama", "train.max_steps=2", "train.batch_size=4", "task.max_new_tokens=4",
        "task.max_eval_samples=6", "task.probe_samples=4", "progress=false",
        'task.teacher.overrides=["train.max_steps=2","train.batch_size=4"]']


def one_hot_logits(probs: list[list[float]]) -> torch.Tensor:
    """(1, T+1, V) logits whose softmax at position t is probs[t] (the last position predicts nothing)."""
    p = torch.tensor(probs + [probs[-1]], dtype=torch.float64)
    return p.log()[None].float()


def test_inverted_hinge_is_one_plus_true_minus_best_other_probability():
    logits = one_hot_logits([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])  # positions 0, 1, 2 predict 1, 2, 3
    labels = torch.tensor([[-100, 0, 2, -100]])  # tokens 1 and 2 scored, token 3 is padding
    # token 1 (true 0): 1 + 0.7 − 0.2 = 1.5;  token 2 (true 2): 1 + 0.1 − 0.7 = 0.4
    assert float(inverted_hinge(logits, labels)) == pytest.approx((1.5 + 0.4) / 2, abs=1e-6)
    assert 0.0 <= float(inverted_hinge(logits, torch.tensor([[-100, 1, 1, 1]]))) <= 2.0


def test_token_nll_matches_the_mean_negative_log_probability():
    logits = one_hot_logits([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    labels = torch.tensor([[-100, 0, 1]])
    assert float(token_nll(logits, labels)) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, abs=1e-6)


class FixedModel:
    """A stand-in for a causal LM: fixed logits for the forget rows, a fixed loss for the retain rows."""

    def __init__(self, logits: torch.Tensor, retain_loss: float) -> None:
        self.logits, self.retain_loss, self.calls = logits, retain_loss, []

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        self.calls.append(sorted(batch))
        if "labels" in batch:  # the retain rows come with labels: the model's own loss
            return SimpleNamespace(loss=torch.tensor(self.retain_loss), logits=self.logits)
        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("objective", ["ga", "gd", "ihl"])
def test_each_objective_combines_its_forget_and_retain_terms(objective):
    logits = one_hot_logits([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    labels = torch.tensor([[-100, 0, 1]])
    batch = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3), "labels": labels,
             "retain_input_ids": torch.zeros(1, 3, dtype=torch.long), "retain_attention_mask": torch.ones(1, 3),
             "retain_labels": labels}
    model = FixedModel(logits, retain_loss=0.25)
    loss = float(objective_loss(model, batch, objective, retain_weight=2.0).loss)
    nll = -(math.log(0.7) + math.log(0.3)) / 2
    ihl = ((1 + 0.7 - 0.2) + (1 + 0.3 - 0.5)) / 2
    expected = {"ga": -nll, "gd": -nll + 2.0 * 0.25, "ihl": ihl + 2.0 * 0.25}[objective]
    assert loss == pytest.approx(expected, abs=1e-6)
    assert model.calls[0] == ["attention_mask", "input_ids"]  # the forget rows' forward takes no labels
    assert len(model.calls) == (1 if objective == "ga" else 2)  # gradient ascent never reads the retain rows


def test_rouge_l_recall_is_the_longest_common_subsequence_over_the_reference():
    assert rouge_l_recall("The cat sat on the mat.", "the cat on mat") == 1.0
    assert rouge_l_recall("cat dog", "the cat sat") == pytest.approx(1 / 3)
    assert rouge_l_recall("", "a b") == 0.0


def test_the_score_is_the_harmonic_mean_of_forgetting_and_retention():
    task = FactsTask()
    scores = {"forget": {"acc": [1.0, 0.0, 0.0, 0.0], "rouge": [0.5] * 4, "prob": [0.1] * 4},
              "retain": {"acc": [1.0] * 4 + [0.0], "rouge": [0.9] * 5, "prob": [0.6] * 5}}
    m = task.metrics_of(scores)
    assert m["forget_acc"] == 0.25 and m["retain_acc"] == 0.8
    assert m["unlearn_score"] == pytest.approx(2 * 0.75 * 0.8 / (0.75 + 0.8))
    assert m["known"] == pytest.approx(5 / 9)
    assert harmonic(0.0, 1.0) == 0.0  # forgetting nothing, or keeping nothing, scores 0


def test_the_forget_set_is_every_fact_of_the_first_people():
    forget, retain = load_facts("offline", 0.1)
    assert (len(forget), len(retain)) == (20, 180)  # 4 of 40 people × 5 facts
    names = lambda rows: {r.response.split(" was ")[0].split("'s ")[0].split(" works ")[0] for r in rows}  # noqa: E731
    assert len(names(forget)) == 4 and not names(forget) & names(retain)
    assert all(r.answer and r.answer in r.response for r in forget + retain)  # each answer states its value
    with pytest.raises(ValueError, match="forgets 0 of 40"):
        load_facts("offline", 0.01)


def test_the_shipped_facts_are_what_the_generator_writes(tmp_path):
    script = DATA.parent / "generate.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g); "
            "import json; print('\\n'.join(json.dumps(r, ensure_ascii=False) for r in g.facts()))")
    out = subprocess.run([sys.executable, "-c", code, str(script)], capture_output=True, text=True, check=True).stdout
    assert out == DATA.read_text(encoding="utf-8")


def test_training_pairs_cover_the_retain_set_once_a_pass():
    task = UnlearnTask()
    pairs = task.examples("train", seed=3)
    forget, retain = task.facts()
    assert len(pairs) == len(retain)
    assert sorted(id(r) for _, r in pairs) == sorted(id(r) for r in retain)
    assert [f for f, _ in pairs[:len(forget)]] == forget  # the forget rows in turn
    with pytest.raises(ValueError, match="no validation split"):
        task.examples("validation")


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="objective must be one of ga, gd, ihl"):
        UnlearnTask(objective="npo")
    with pytest.raises(ValueError, match="forget splits of"):
        load_facts("tofu", 0.2)


def test_the_teacher_is_one_cell_whatever_unlearns_from_it():
    ids = set()
    for extra in (["method=lora"], ["method=fila", "task.objective=ga"], ["method=full", "seed=1"]):
        overrides = ["task=unlearn/facts", *TINY, *extra]
        cfg = compose_cfg(overrides)
        ids.add(teacher_cell(cfg, UnlearnTask(teacher=cfg.task.teacher), overrides).run_id)
    assert len(ids) == 1
    cfg = compose_cfg(["task=unlearn/facts", *TINY, "task.forget_fraction=0.2"])
    other = teacher_cell(cfg, UnlearnTask(teacher=cfg.task.teacher), ["task=unlearn/facts", *TINY,
                                                                        "task.forget_fraction=0.2"])
    assert other.run_id not in ids  # its eval split differs: another cell


def test_an_unlearning_cell_starts_from_its_teacher(tmp_path):
    record = run(compose_cfg(["method=lora", "task=unlearn/facts", *TINY, f"results_dir={tmp_path}"]))
    assert record["status"] == "completed", record["error"]
    teacher = json.loads((tmp_path / "runs" / record["taught"]["run_id"] / "record.json").read_text())
    assert teacher["task"] == "unlearn/facts_teach" and teacher["method"] == "full"
    m = record["metrics"]
    assert m["taught/known"] == pytest.approx(teacher["metrics"]["known"], abs=0.01)  # the rebuilt taught model
    assert record["main_metric"] == "unlearn_score" and 0.0 <= m["unlearn_score"] <= 1.0
    assert {"forget_acc", "forget_rouge", "forget_prob", "retain_acc", "retain_rouge", "retain_prob"} <= set(m)
    # the taught model's probe is the unlearning run's "before"
    assert m["forget_ce_base"] == pytest.approx(teacher["metrics"]["forget_ce"], rel=1e-4)

    again = run(compose_cfg(["method=fila", "task=unlearn/facts", "task.objective=gd", *TINY,
                             f"results_dir={tmp_path}"]))
    assert again["status"] == "completed", again["error"]
    assert again["taught"]["run_id"] == record["taught"]["run_id"]  # reused, not retrained
    assert json.loads((tmp_path / "runs" / record["taught"]["run_id"] / "record.json").read_text())["attempts"] == 1


def test_an_unlearning_run_refuses_export(tmp_path):
    with pytest.raises(ConfigError, match="no PEFT export"):
        run(compose_cfg(["method=lora", "task=unlearn/facts", *TINY, "export=true", f"results_dir={tmp_path}"]))
