"""GlueTask: heads, batching, evaluation splits and the length-grouped sampler."""

from __future__ import annotations

import pytest
import torch

from bench.data import LengthGroupedBatchSampler
from tasks.glue import GlueTask
from tests.helpers import tiny


def test_heads_and_eval_splits():
    assert GlueTask("stsb").head.problem_type == "regression" and GlueTask("stsb").head.num_labels == 1
    assert GlueTask("mnli").head.num_labels == 3
    for name in ("mnli", "qqp"):
        task = GlueTask(name)
        assert task.eval_split == "heldout_from_train" and "held out" in task.eval_note
    assert GlueTask("sst2").eval_split == "dev" and GlueTask("sst2").eval_note == ""


def test_subsets_are_deterministic_and_eval_subset_ignores_the_run_seed():
    task = GlueTask("sst2", max_train_samples=50, max_eval_samples=40)
    assert task.examples("train", seed=1) == task.examples("train", seed=1)
    assert task.examples("train", seed=1) != task.examples("train", seed=2)
    assert len(task.examples("eval")) == 40 and task.examples("eval") == GlueTask("sst2", max_eval_samples=40).examples("eval")


def test_collate_pairs_and_regression_labels():
    t = tiny("lora", task="glue/stsb")
    batch = t.task.collate_fn(t.tokenizer)(t.task.examples("train")[:4])
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"].shape[0] == 4
    assert (batch["token_type_ids"] == 1).any(), "sentence pairs must be encoded as pairs"


def test_length_grouped_sampler_covers_every_row_once_per_epoch_and_cuts_padding():
    lengths = torch.randint(1, 100, (1000,)).tolist()
    sampler = LengthGroupedBatchSampler(lengths, 10, torch.Generator().manual_seed(0), mega_batches=10)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # random batches of 10 from U[1, 99] spread over ~80
    again = list(LengthGroupedBatchSampler(lengths, 10, torch.Generator().manual_seed(0), mega_batches=10))
    assert again == batches


def test_chance_is_the_best_constant_prediction_on_the_real_dev_sets():
    mrpc = GlueTask("mrpc")
    rows = mrpc.examples("eval")
    positive = sum(r.label for r in rows) / len(rows)  # 279 of 408 dev pairs are paraphrases
    chance = mrpc.chance(rows)
    # always "paraphrase": precision = the positive share, recall 1; accuracy: the larger class
    assert chance["f1"] == pytest.approx(2 * positive / (1 + positive))
    assert chance["accuracy"] == pytest.approx(max(positive, 1 - positive))
    cola = GlueTask("cola")
    assert cola.chance(cola.examples("eval")) == {"matthews_corr": 0.0}  # a constant prediction has MCC 0
    assert GlueTask("stsb").chance(GlueTask("stsb").examples("eval")) == {"pearson": 0.0, "spearman": 0.0}
