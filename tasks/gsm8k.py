"""GSM8K: grade-school math word problems (Cobbe et al., arXiv 2110.14168), question → worked solution "#### N".

Data: the offline copies in tasks/data/gsm8k (see its PROVENANCE.md): OpenAI's train.jsonl (7473) and test.jsonl
(1319), byte for byte. Scoring follows LLM-Adapters' evaluate.py (AGI-Edgerunners/LLM-Adapters
@ 816657208af4db747803f87ba40a4c71383fed7a): a prediction is correct when |prediction - gold| <= 0.001.
Where it differs:

* the prediction is the first number after "####" when the generation has one (the format the model is trained to
  end with; a model that goes on talking after it would otherwise be scored on a later number), else the last
  number in the generation (LLM-Adapters' rule);
* thousands separators are removed only between digit groups ("1,234,567" → "1234567"; "3,4" stays two numbers);
  LLM-Adapters deletes every comma;
* the training target is OpenAI's worked solution, its calculator annotations "<<48/2=24>>" removed by default
  (keep_calculator_annotations=true keeps them); LLM-Adapters trains on math_10k (not available offline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from tasks.generative import EvalMode, Example, GenerativeTask, hub_rows

DATA_DIR = Path(__file__).resolve().parent / "data" / "gsm8k"
FILES = {"train": "train.jsonl", "eval": "test.jsonl"}

_NUMBER = re.compile(r"-?\d+\.?\d*")  # LLM-Adapters' evaluate.py pattern
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # a comma between a digit and exactly three digits
_CALCULATOR = re.compile(r"<<[^<>]*>>")
TOLERANCE = 1e-3  # LLM-Adapters' `miss`


def strip_thousands(text: str) -> str:
    """Remove thousands separators: "$1,234,567.5" → "$1234567.5"; other commas stay."""
    return _THOUSANDS.sub("", text)


def reference_answer(solution: str) -> str:
    """The gold answer of a GSM8K solution: the text after "####", thousands separators removed ("1,080" → "1080")."""
    if "####" not in solution:
        raise ValueError(f"a GSM8K solution without '####': {solution[-80:]!r}")
    return strip_thousands(solution.split("####")[-1].strip())


def extract_number(text: str) -> float | None:
    """The predicted number of a generation: the first number after "####" if there is one, else the last number;
    None when there is none."""
    text = strip_thousands(text)
    if "####" in text:
        after = _NUMBER.search(text.split("####", 1)[1])
        if after:
            return float(after.group())
    numbers = _NUMBER.findall(text)
    return float(numbers[-1]) if numbers else None


def is_correct(prediction: float | None, gold: float) -> bool:
    return prediction is not None and abs(prediction - gold) <= TOLERANCE


def load_offline(split: Literal["train", "eval"], keep_calculator_annotations: bool = False,
                 data_dir: Path = DATA_DIR) -> list[Example]:
    """GSM8K rows: instruction = the question, response = the solution, answer = the gold number as a string."""
    rows = []
    with (data_dir / FILES[split]).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            solution = obj["answer"] if keep_calculator_annotations else _CALCULATOR.sub("", obj["answer"])
            rows.append(Example(instruction=obj["question"], response=solution,
                                answer=reference_answer(obj["answer"]), dataset="gsm8k"))
    return rows


METAMATH_ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.S)


def metamath_example(obj: dict[str, str]) -> Example:
    """A MetaMathQA row (meta-math/MetaMathQA: `query`, `response` ending "The answer is: N") as a training row."""
    found = METAMATH_ANSWER.search(obj["response"])
    return Example(instruction=obj["query"], response=obj["response"],
                   answer=strip_thousands(found.group(1)) if found else "", dataset="metamathqa")


class Gsm8kTask(GenerativeTask):
    """GSM8K as generation: train on question → solution, score exact match of the final number.

    Args:
        keep_calculator_annotations: keep "<<expr=value>>" in the training targets.
        train_source: offline (OpenAI's train split) or a hub id of MetaMathQA's format (meta-math/MetaMathQA).
        (the rest: see GenerativeTask)
    """

    name = "gsm8k"
    datasets = ("gsm8k",)
    main_metric = "exact_match"
    higher_is_better = {"exact_match": True}
    eval_split = "test"  # OpenAI's test split (the split papers report)

    def __init__(self, keep_calculator_annotations: bool = False, eval_mode: EvalMode = "generate",
                 **common: Any) -> None:
        if eval_mode != "generate":
            raise ValueError("GSM8K is scored by generation only (eval_mode=generate): it has no answer choices")
        super().__init__(eval_mode=eval_mode, **common)
        self.keep_calculator_annotations = bool(keep_calculator_annotations)

    def _load(self, split: Literal["train", "eval"]) -> list[Example]:
        if split == "train" and self.train_source != "offline":
            return [metamath_example(obj) for obj in hub_rows(self.train_source, "train")]
        return load_offline(split, self.keep_calculator_annotations)

    def gold(self, row: Example) -> float:
        return float(row.answer)

    def judge(self, text: str, dataset: str, gold: float) -> tuple[bool, str]:
        pred = extract_number(text)
        return is_correct(pred, gold), "" if pred is None else repr(pred)
