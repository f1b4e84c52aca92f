"""Tests for tasks.glue_data: offline GLUE copies (counts from each PROVENANCE.md) and metrics."""

from __future__ import annotations

import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tasks.glue_data import (
    DEFAULT_DATA_DIR,
    GLUE_SPECS,
    GLUE_TASKS,
    Example,
    compute_metrics,
    get_spec,
    load_offline,
    offline_paths,
)

# (task, split) -> (rows, label counts keyed by label name; None for STS-B), from PROVENANCE.md.
EXPECTED: dict[tuple[str, str], tuple[int, dict[str, int] | None]] = {
    ("cola", "train"): (8551, None),
    ("cola", "eval"): (1043, {"1": 721, "0": 322}),
    ("sst2", "train"): (67349, None),
    ("sst2", "eval"): (872, {"1": 444, "0": 428}),
    ("mrpc", "train"): (3668, {"1": 2474, "0": 1194}),
    ("mrpc", "eval"): (408, {"1": 279, "0": 129}),
    ("stsb", "train"): (5749, None),
    ("stsb", "eval"): (1500, None),
    ("qnli", "train"): (8999, {"entailment": 4523, "not_entailment": 4476}),
    ("qnli", "eval"): (5463, {"entailment": 2702, "not_entailment": 2761}),
    ("rte", "train"): (2490, {"entailment": 1249, "not_entailment": 1241}),
    ("rte", "eval"): (277, {"entailment": 146, "not_entailment": 131}),
    ("mnli", "train"): (8999, {"entailment": 3061, "neutral": 2980, "contradiction": 2958}),
    ("mnli", "eval"): (1000, {"entailment": 347, "neutral": 333, "contradiction": 320}),
    ("qqp", "train"): (8999, {"0": 5747, "1": 3252}),
    ("qqp", "eval"): (1000, {"0": 623, "1": 377}),
}


def _label_counts(task: str, examples: list[Example]) -> dict[str, int]:
    names = GLUE_SPECS[task].label_names
    return dict(Counter(names[int(ex.label)] for ex in examples))


# ------------------------------------------------------------------------------------- specs


def test_specs_cover_glue_and_match_hf_label_order() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qnli", "rte", "mnli", "qqp"}
    assert GLUE_SPECS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_SPECS["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_SPECS["qnli"].label_names == ("entailment", "not_entailment")
    assert GLUE_SPECS["mnli"].hub_eval_split == "validation_matched"
    assert GLUE_SPECS["cola"].main_metric == "matthews_corr"
    assert GLUE_SPECS["mrpc"].main_metric == GLUE_SPECS["qqp"].main_metric == "f1"
    assert GLUE_SPECS["stsb"].is_regression and GLUE_SPECS["stsb"].num_labels == 1
    assert GLUE_SPECS["stsb"].metrics == ("pearson", "spearman")
    for name, spec in GLUE_SPECS.items():
        assert spec.name == name
        assert spec.main_metric in spec.metrics
        assert len(spec.text_keys) in (1, 2)
        if not spec.is_regression:
            assert spec.num_labels == len(spec.label_names)
        assert spec.eval_is_official_dev == (name not in ("mnli", "qqp"))
        if not spec.eval_is_official_dev:
            assert "heldout_from_train_1k.json" in spec.eval_note
    assert "SuperGLUE" in GLUE_SPECS["rte"].eval_note
    assert get_spec("SST-2") is GLUE_SPECS["sst2"]
    with pytest.raises(ValueError, match="unknown GLUE task"):
        get_spec("wnli")


# ------------------------------------------------------------------------------ offline data


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED))
def test_offline_counts(task: str, split: str) -> None:
    rows, counts = EXPECTED[(task, split)]
    examples = load_offline(task, split)  # type: ignore[arg-type]
    assert len(examples) == rows
    spec = GLUE_SPECS[task]
    for ex in examples:
        assert isinstance(ex.text_a, str) and ex.text_a.strip()
        if spec.is_pair:
            assert isinstance(ex.text_b, str) and ex.text_b.strip()
        else:
            assert ex.text_b is None
        if spec.is_regression:
            assert isinstance(ex.label, float)
        else:
            assert isinstance(ex.label, int) and 0 <= ex.label < spec.num_labels
    if counts is not None:
        assert _label_counts(task, examples) == counts


def test_sst2_train_is_both_parts_in_order() -> None:
    train = load_offline("sst2", "train")
    assert train[0].text_a == "when are bears bears and "  # first row of train_part1.tsv
    assert train[60614].text_a == "the expressive power of the camera "  # first row of part2
    assert _label_counts("sst2", train)["1"] + _label_counts("sst2", train)["0"] == 67349
    dev = load_offline("sst2", "eval")
    assert dev[0] == Example("it 's a charming and often affecting journey . ", None, 1)


def test_cola_headerless_four_columns() -> None:
    dev = load_offline("cola", "eval")
    assert dev[0] == Example("The sailors rode the breeze clear of the rocks.", None, 1)
    train = load_offline("cola", "train")
    # Raw quotes are kept (QUOTE_NONE) and the author's-mark column is not mistaken for the text.
    assert Example('Susan whispered "Shut up".', None, 1) in train
    assert not any(ex.text_a in ("*", "") for ex in train)


def test_mrpc_bom_and_raw_quotes() -> None:
    dev = load_offline("mrpc", "eval")
    first = dev[0]
    assert not first.text_a.startswith("\ufeff")
    assert first.text_a.startswith("He said the foodservice pie business")
    # Unbalanced leading quote: a quoting csv reader would swallow following rows.
    assert first.text_b == '"The foodservice pie business does not fit our long-term growth strategy.'
    assert first.label == 1
    assert dev[1].label == 0
    assert '"100 percent behind George Bush"' in (dev[1].text_b or "")
    assert sum('"' in ex.text_a + (ex.text_b or "") for ex in dev) == 85
    train = load_offline("mrpc", "train")
    assert not train[0].text_a.startswith("\ufeff")
    assert train[0].text_a.startswith('Amrozi accused his brother, whom he called "the witness"')


def test_stsb_scores() -> None:
    dev = load_offline("stsb", "eval")
    scores = np.array([ex.label for ex in dev])
    assert scores.min() >= 0.0 and scores.max() <= 5.0
    assert scores.min() == 0.0 and scores.max() == 5.0
    assert dev[0] == Example("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert dev[1].label == pytest.approx(4.75)
    assert any('"' in ex.text_a + (ex.text_b or "") for ex in dev)
    train = load_offline("stsb", "train")
    assert train[1].label == pytest.approx(3.8)


def test_pair_tasks_field_mapping() -> None:
    rte_dev = load_offline("rte", "eval")
    assert rte_dev[0].text_b == "Christopher Reeve had an accident."
    assert rte_dev[0].label == GLUE_SPECS["rte"].label_names.index("not_entailment") == 1
    assert rte_dev[1].label == 0  # entailment
    rte_train = load_offline("rte", "train")
    assert rte_train[0] == Example(
        "No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.", 1
    )
    qnli_dev = load_offline("qnli", "eval")
    assert qnli_dev[0].text_a == "What came into force after the new constitution was herald?"
    assert qnli_dev[0].label == 0 and qnli_dev[1].label == 1
    assert sum('"' in ex.text_a + (ex.text_b or "") for ex in qnli_dev) > 0
    qqp_eval = load_offline("qqp", "eval")
    assert qqp_eval[0].label == 0 and qqp_eval[1].label == 1  # string labels "0"/"1"
    assert qqp_eval[1].text_a == "If I want to change my name what should I do?"
    mnli_eval = load_offline("mnli", "eval")
    assert mnli_eval[0] == Example("Salt kept the town fed.", "Salt kept the town thriving.", 0)


def test_cache_returns_fresh_lists() -> None:
    a = load_offline("rte", "eval")
    a.clear()
    b = load_offline("rte", "eval")
    assert len(b) == 277
    assert b is not load_offline("rte", "eval")
    with pytest.raises(AttributeError):
        b[0].label = 5  # type: ignore[misc]


def test_missing_file_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_offline("mnli", "eval", data_dir=tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "mnli" / "heldout_from_train_1k.json") in msg
    assert "tasks/data/glue" in msg and "PROVENANCE.md" in msg


def test_custom_data_dir(tmp_path: Path) -> None:
    shutil.copytree(DEFAULT_DATA_DIR / "rte", tmp_path / "rte")
    assert load_offline("rte", "eval", data_dir=tmp_path) == load_offline("rte", "eval")
    assert offline_paths("sst2", "train", tmp_path) == (
        tmp_path / "sst2" / "train_part1.tsv",
        tmp_path / "sst2" / "train_part2.tsv",
    )


def test_bad_label_and_split(tmp_path: Path) -> None:
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n")
    with pytest.raises(ValueError, match="unknown label 'neutral'"):
        load_offline("rte", "eval", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_offline("rte", "test", data_dir=tmp_path)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- metrics


def test_matthews_hand_computed() -> None:
    # TP=2, TN=1, FP=1, FN=0 -> (2*1 - 1*0) / sqrt(3*2*2*1) = 2 / sqrt(12)
    out = compute_metrics("cola", np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]))
    assert out == {"matthews_corr": pytest.approx(2 / math.sqrt(12))}
    assert isinstance(out["matthews_corr"], float)


def test_f1_and_accuracy_hand_computed() -> None:
    # preds 1,1,0,0,1 vs gold 1,0,1,0,1: TP=2 FP=1 FN=1 -> P=R=2/3, F1=2/3; acc 3/5.
    out = compute_metrics("mrpc", [1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert set(out) == {"f1", "accuracy"}
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(0.6)
    # Logits are arg-maxed.
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert compute_metrics("qqp", logits, [1, 0, 0]) == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(2 / 3)}
    assert compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 1]) == {"accuracy": 0.75}


def test_correlations() -> None:
    x = np.array([0.0, 1.5, 2.0, 4.0, 5.0])
    out = compute_metrics("stsb", x, x)
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    out = compute_metrics("stsb", x.reshape(-1, 1), -x)
    assert out["pearson"] == pytest.approx(-1.0)
    # Monotone but non-linear: Spearman 1, Pearson < 1.
    out = compute_metrics("stsb", np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 100.0]))
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] < 0.9


def test_constant_predictions_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compute_metrics("stsb", np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 4.0]))
        assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])
        assert compute_metrics("cola", [1, 1, 1], [1, 0, 1]) == {"matthews_corr": 0.0}
        assert compute_metrics("qqp", [0, 0], [1, 0])["f1"] == 0.0


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="length"):
        compute_metrics("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics("sst2", [], [])


# -------------------------------------------------------------------------- hub (mocked)


def test_load_hub_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from tasks.glue_data import load_hub

    calls: list[tuple[str, str, str]] = []

    def fake_load_dataset(dataset_id: str, name: str, split: str) -> list[dict[str, object]]:
        calls.append((dataset_id, name, split))
        if name == "qqp":
            raise ConnectionError("offline")
        if name == "stsb":
            return [{"sentence1": "a", "sentence2": "b", "label": 3.2, "idx": 0}]
        return [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]

    fake = types.ModuleType("datasets")
    fake.load_dataset = fake_load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_hub("mnli", "eval") == [Example("p", "h", 2)]
    assert load_hub("stsb", "train", dataset_id="glue") == [Example("a", "b", 3.2)]
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"), ("glue", "stsb", "train")]
    with pytest.raises(RuntimeError, match="task.source=offline"):
        load_hub("qqp", "eval")

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"deltabench\[hub\]"):
        load_hub("sst2", "train")
