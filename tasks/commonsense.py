"""Commonsense reasoning: the 8-task suite of LLM-Adapters and DoRA (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande,
ARC-e, ARC-c, OBQA), one model trained on a mixture and evaluated on each set.

Data: tasks/data/commonsense (see its PROVENANCE.md): LLM-Adapters' files (AGI-Edgerunners/LLM-Adapters @
816657208af4db747803f87ba40a4c71383fed7a), each row `instruction` (question, options, "Answer format: ..."),
`output` ("the correct answer is answer3"), `answer` (the label). HellaSwag is rebuilt at load time from klosax's
text copy of the validation set (hellaswag_source/, 1.9 MB instead of a 10.7 MB JSON) in LLM-Adapters' format;
its text is lm-eval-preprocessed (no WikiHow "[header]"/"[step]" markup), so it is not byte-identical to
LLM-Adapters' file. Only 4 of the 8 train sets are available offline (boolq, ARC-Easy, ARC-Challenge,
openbookqa: the same format as commonsense_170k, which is not); the 8 eval sets are complete.

Scoring (eval_mode=generate) follows commonsense_evaluate.py: the prediction is the first occurrence of one of the
set's answer keywords in the generation (case-sensitive regex alternation, as there), correct when it equals the
label. Differences: greedy decoding instead of 4-beam search; max_new_tokens is a task argument (the reference: 32).
eval_mode=loglik instead picks the candidate response "the correct answer is <label>" with the highest
log-likelihood among the labels the row's "Answer format" line offers.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any, Literal

from tasks.generative import Example, GenerativeTask, hub_rows

DATA_DIR = Path(__file__).resolve().parent / "data" / "commonsense"
SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa")
TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")  # the train splits available offline
HELLASWAG_SOURCE = "hellaswag_source/hellaswag_val_full.txt.bz2"

# The answer keywords commonsense_evaluate.py's extract_answer looks for, per set.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
}
_KEYWORD_RE = {name: re.compile("|".join(words)) for name, words in KEYWORDS.items()}
_ANSWER_FORMAT = re.compile(r"Answer format: (\w+(?:/\w+)+)\s*$")
RESPONSE = "the correct answer is {label}"  # LLM-Adapters' `output` for every row


def extract_answer(dataset: str, text: str) -> str:
    """The first answer keyword of `dataset` in a generation, or "" when there is none (commonsense_evaluate.py)."""
    found = _KEYWORD_RE[dataset].search(text.strip())
    return found.group() if found else ""


def answer_options(instruction: str) -> tuple[str, ...]:
    """The labels a row offers, from its last line "Answer format: answer1/answer2/answer3"."""
    found = _ANSWER_FORMAT.search(instruction)
    if not found:
        raise ValueError(f"no 'Answer format:' line in {instruction[-120:]!r}")
    return tuple(found.group(1).split("/"))


def _example(obj: dict[str, str], dataset: str) -> Example:
    labels = answer_options(obj["instruction"])
    if obj["answer"] not in labels:
        raise ValueError(f"{dataset}: gold label {obj['answer']!r} is not among the offered {labels}")
    return Example(instruction=obj["instruction"], response=obj["output"], answer=obj["answer"], dataset=dataset,
                   choices=tuple(RESPONSE.format(label=label) for label in labels), gold=labels.index(obj["answer"]))


def hellaswag_rows(path: Path) -> list[dict[str, str]]:
    """HellaSwag validation in LLM-Adapters' format, from klosax's text file: 6 lines per item (activity label +
    ": " + context, the 0-based gold ending, the 4 endings)."""
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not 6 per item")
    rows = []
    for i in range(0, len(lines), 6):
        context, label, endings = lines[i], int(lines[i + 1]), lines[i + 2:i + 6]
        options = " ".join(f"Ending{k + 1}: {e}" for k, e in enumerate(endings))
        rows.append({
            "instruction": ("Please choose the correct ending to complete the given sentence: " + context + "\n\n"
                            + options + "\n\nAnswer format: ending1/ending2/ending3/ending4"),
            "input": "", "output": f"the correct answer is ending{label + 1}", "answer": f"ending{label + 1}",
        })
    return rows


def load_set(dataset: str, split: Literal["train", "eval"], data_dir: Path = DATA_DIR) -> list[Example]:
    """One set's rows (split eval = LLM-Adapters' test.json)."""
    if dataset not in SETS:
        raise ValueError(f"unknown commonsense set {dataset!r}; choose from {SETS}")
    if split == "train" and dataset not in TRAIN_SETS:
        raise ValueError(f"no offline train split for {dataset!r}; available: {TRAIN_SETS}")
    if split == "eval" and dataset == "hellaswag":
        raw = hellaswag_rows(data_dir / HELLASWAG_SOURCE)
    else:
        path = data_dir / ("train" if split == "train" else "test") / f"{dataset}.json"
        raw = json.loads(path.read_text(encoding="utf-8"))
    return [_example(obj, dataset) for obj in raw]


class CommonsenseTask(GenerativeTask):
    """The commonsense suite as one task: train on a mixture of sets, report accuracy per eval set and their mean.

    Args:
        train_sets: sets whose train splits are mixed for training (offline: a subset of TRAIN_SETS).
        eval_sets: sets evaluated; `accuracy` is their unweighted mean (DoRA's "Avg."), `accuracy/<set>` each.
        (the rest: see GenerativeTask; max_eval_samples applies per eval set)
    """

    name = "commonsense"
    main_metric = "accuracy"
    eval_split = "test"
    eval_note = ("LLM-Adapters' test files: BoolQ, PIQA, SIQA, HellaSwag and WinoGrande are their public validation "
                 "splits; HellaSwag text is lm-eval-preprocessed (klosax), not LLM-Adapters' raw WikiHow markup. "
                 "Trained on the offline train sets only (commonsense_170k is not available offline).")

    def __init__(self, train_sets: list[str] | tuple[str, ...] = TRAIN_SETS,
                 eval_sets: list[str] | tuple[str, ...] = SETS, max_length: int = 256, max_new_tokens: int = 32,
                 **common: Any) -> None:
        super().__init__(max_length=max_length, max_new_tokens=max_new_tokens, **common)
        for s in [*train_sets, *eval_sets]:
            if s not in SETS:
                raise ValueError(f"unknown commonsense set {s!r}; choose from {SETS}")
        missing = [s for s in train_sets if s not in TRAIN_SETS]
        if missing and self.train_source == "offline":
            raise ValueError(f"no offline train split for {missing}; available: {list(TRAIN_SETS)}")
        if not train_sets or not eval_sets:
            raise ValueError("train_sets and eval_sets must each name at least one set")
        self.train_sets, self.datasets = tuple(train_sets), tuple(eval_sets)
        if self.train_source != "offline":
            self.eval_note = self.eval_note.replace(
                "Trained on the offline train sets only (commonsense_170k is not available offline).",
                f"Trained on commonsense_170k ({self.train_source}).")
        self.higher_is_better = {"accuracy": True, **{f"accuracy/{s}": True for s in self.datasets}}

    def _load(self, split: Literal["train", "eval"]) -> list[Example]:
        if split == "train" and self.train_source != "offline":  # commonsense_170k: all 8 sets, one file
            return [_example(obj, "commonsense_170k") for obj in hub_rows(self.train_source, "train")]
        sets = self.train_sets if split == "train" else self.datasets
        return [row for s in sets for row in load_set(s, split)]

    def gold(self, row: Example) -> float:
        return float(KEYWORDS[row.dataset].index(row.answer))  # the label as an index into its set's keywords

    def judge(self, text: str, dataset: str, gold: float) -> tuple[bool, str]:
        pred = extract_answer(dataset, text)
        return pred == KEYWORDS[dataset][int(gold)], pred
