"""Knowledge unlearning on a causal LM: teach it facts, then make it forget some of them and keep the rest.

    python -m bench task=unlearn/facts method=lora task.objective=ihl     # the taught model trains first (once)
    python -m bench +experiment=unlearn -m                                 # the committed table (results/unlearn)

Two task options share the data:

* `unlearn/facts_teach` (TeachTask) fine-tunes the pretrained model on every fact, forget and retain alike; its run
  is the "taught" model, as TOFU's fine-tuned base model (Maini et al., arXiv 2401.06121).
* `unlearn/facts` (UnlearnTask) starts from the taught model (bench/unlearn.py trains or reuses it, a cell of its own)
  and trains the chosen method on an unlearning objective; ΔW is the change from the taught weights.

Data: offline, tasks/data/unlearn/facts.jsonl (five facts about each of 40 fictitious people, generated with a fixed
seed by generate.py beside it); the forget set is every fact of the first `forget_fraction` of the people (TOFU's
forget01/05/10 split authors the same way). Hub: `source=tofu` reads locuslab/TOFU's forget{N} and retain{100-N}.

Objectives (Cha et al., "Towards Robust and Cost-Efficient Knowledge Unlearning for Large Language Models",
ICLR 2025, arXiv 2408.06621; reference csm9493/efficient-llm-unlearning; see `objective_loss`), each over a batch of
forget rows and, except ga, as many retain rows:

    ga    gradient ascent:      L = −NLL(forget)
    gd    gradient difference:  L = −NLL(forget) + w·NLL(retain)
    ihl   inverted hinge loss:  L = IHL(forget) + w·NLL(retain),  IHL = mean over answer tokens of
                                1 + p(y_t | y_<t) − max_{v ≠ y_t} p(v | y_<t)

Metrics, on the forget set and on the retain set (each row: greedy answer to the question):
    {split}_acc     the attribute value appears in the answer (case-folded; offline facts only)
    {split}_rouge   ROUGE-L recall of the answer against the gold answer (TOFU's; tokens are lower-cased
                    alphanumeric runs, no stemmer)
    {split}_prob    p(gold answer | question)^(1/|answer|), the per-token geometric mean (TOFU's normalised probability)
    unlearn_score   the harmonic mean of (1 − forget_X) and retain_X, X = acc offline (rouge on TOFU): high only
                    when the forget facts are gone and the retain facts kept; the main metric.
The forgetting probe of every generative task (general text's cross-entropy, before and after) is the
general-knowledge check.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tasks.base import RETAIN_PREFIX, Batch, model_inputs
from tasks.generative import (Example, GenerativeTask, choices_batch, continuation_logprobs, greedy_generate,
                              hub_rows, pad_id, prompt_batch, resolve_format, trim_left)

DATA = Path(__file__).resolve().parent / "data" / "unlearn" / "facts.jsonl"
TOFU = "locuslab/TOFU"
TOFU_SPLITS = (1, 5, 10)  # forget01 / forget05 / forget10 (percent of the 200 authors)
OBJECTIVES = ("ga", "gd", "ihl")
SPLITS = ("forget", "retain")
_WORDS = re.compile(r"[a-z0-9]+")


# ---------------------------------------------------------------------------------------------- data


def load_facts(source: str, forget_fraction: float, data: Path = DATA) -> tuple[list[Example], list[Example]]:
    """(forget rows, retain rows). Example.answer is the attribute value (offline) or "" (TOFU: no short value)."""
    if source == "offline":
        rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        people = sorted({r["person"] for r in rows})
        cut = round(forget_fraction * len(people))
        if not 0 < cut < len(people):
            raise ValueError(f"task.forget_fraction={forget_fraction} forgets {cut} of {len(people)} people; choose "
                             f"a fraction that forgets at least one and keeps at least one")
        forget = set(people[:cut])
        ex = lambda r, split: Example(instruction=r["question"], response=r["answer"], answer=r["value"],  # noqa: E731
                                      dataset=split)
        return ([ex(r, "forget") for r in rows if r["person"] in forget],
                [ex(r, "retain") for r in rows if r["person"] not in forget])
    if source == "tofu":
        pct = round(forget_fraction * 100)
        if pct not in TOFU_SPLITS:
            raise ValueError(f"TOFU has forget splits of {TOFU_SPLITS} percent; task.forget_fraction={forget_fraction}")
        load = lambda name, split: [Example(instruction=r["question"], response=r["answer"], answer="",  # noqa: E731
                                            dataset=split) for r in hub_rows(TOFU, "train", name)]
        return load(f"forget{pct:02d}", "forget"), load(f"retain{100 - pct}", "retain")
    raise ValueError(f"task.source must be offline or tofu; got {source!r}")


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: the longest common subsequence of the two token sequences over the reference's length."""
    p, r = _WORDS.findall(prediction.lower()), _WORDS.findall(reference.lower())
    if not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(r)


def contains_value(prediction: str, value: str) -> bool:
    return bool(value) and value.casefold() in prediction.casefold()


def harmonic(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


# ---------------------------------------------------------------------------------------------- losses


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (labels −100 are ignored), as a causal LM's loss."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)


def inverted_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IHL = mean over labelled tokens of 1 + p(y_t) − max_{v ≠ y_t} p(v), in [0, 2].

    logits (B, T, V), labels (B, T) with −100 on unscored tokens; position t predicts token t + 1. Minimising it
    lowers the true token's probability and raises the strongest alternative's, so the model moves to its next
    guess instead of to any token (gradient ascent's unbounded push), which keeps it fluent.
    """
    probs = logits[:, :-1].float().softmax(-1)  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    scored = target != -100  # (B, T-1)
    idx = target.clamp(min=0)[..., None]  # (B, T-1, 1)
    p_true = probs.gather(-1, idx)[..., 0]  # (B, T-1)
    p_other = probs.scatter(-1, idx, float("-inf")).amax(-1)  # (B, T-1): the best token other than the true one
    hinge = 1 + p_true - p_other  # (B, T-1)
    return hinge[scored].mean()


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """(the forget rows' model inputs, the retain rows' model inputs) of an unlearning batch."""
    forget = model_inputs(batch)
    retain = {k[len(RETAIN_PREFIX):]: v for k, v in batch.items() if k.startswith(RETAIN_PREFIX)}
    return forget, retain


class Objective:
    """The loss of an unlearning step, and the model output the trainer (and a method's extra loss) reads."""

    def __init__(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.loss, self.logits = loss, logits


def objective_loss(model: Callable[..., Any], batch: Batch, objective: str, retain_weight: float) -> Objective:
    """One unlearning objective over a batch whose forget rows are input_ids/attention_mask/labels and whose retain
    rows carry the `retain_` prefix (see the module docstring for the formulas)."""
    forget, retain = split_batch(batch)
    labels = forget.pop("labels")
    out = model(**forget)
    if objective == "ihl":
        loss = inverted_hinge(out.logits, labels)
    else:
        loss = -token_nll(out.logits, labels)
    if objective in ("gd", "ihl") and retain_weight:
        if not retain:
            raise ValueError(f"objective {objective} needs retain rows in the batch (retain_input_ids, ...)")
        loss = loss + retain_weight * model(**retain).loss
    return Objective(loss, out.logits)


# ---------------------------------------------------------------------------------------------- tasks


class FactsTask(GenerativeTask):
    """What the teach and the unlearn tasks share: the facts, their evaluation and metrics.

    Args:
        source: offline (tasks/data/unlearn/facts.jsonl) or tofu (locuslab/TOFU on the hub; needs .[hub]).
        forget_fraction: the share of people (TOFU: authors) whose facts form the forget set.
        max_eval_samples: facts scored per set, forget and retain (a fixed random subset; null: all).
        (the rest as GenerativeTask)
    """

    datasets = SPLITS

    def __init__(self, source: str = "offline", forget_fraction: float = 0.1, **generative: Any) -> None:
        generative.setdefault("max_new_tokens", 32)
        super().__init__(**generative)
        if not 0 < float(forget_fraction) < 1:
            raise ValueError(f"task.forget_fraction must be in (0, 1); got {forget_fraction}")
        if source not in ("offline", "tofu"):
            raise ValueError(f"task.source must be offline or tofu; got {source!r}")
        self.source, self.forget_fraction = str(source), float(forget_fraction)
        self._facts: tuple[list[Example], list[Example]] | None = None

    def facts(self) -> tuple[list[Example], list[Example]]:
        if self._facts is None:
            self._facts = load_facts(self.source, self.forget_fraction)
        return self._facts

    def _load(self, split: str) -> list[Example]:
        forget, retain = self.facts()
        return forget + retain  # eval: GenerativeTask._eval_rows subsets each set (max_eval_samples)

    def examples(self, split: Literal["train", "eval", "validation"], seed: int = 0) -> list[Any]:
        if split == "validation":
            raise ValueError(f"task {self.name} has no validation split (unlearning is not tuned on held-out "
                             "facts); run it under protocol=none")
        return self._eval_rows() if split == "eval" else self._train_rows(seed)

    def _train_rows(self, seed: int) -> list[Any]:
        raise NotImplementedError

    def chance(self, rows: Sequence[Example]) -> dict[str, float]:
        """None: every fact has its own answer and the scores are a forget/retain trade-off, not a classification
        with a floor."""
        return {}

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[Sequence[Example]], Batch]:
        """Eval batches: left-padded prompts to generate from, prompt + gold answer to score (mc_*), and the row's
        split (dataset: 0 forget, 1 retain) and index among all facts (row)."""
        self.tokenizer = tokenizer
        fmt = resolve_format(tokenizer, self.prompt_format)
        forget, retain = self.facts()  # every row a batch can hold is one of these objects (they are cached)
        self._rows_by_index = forget + retain
        index = {id(r): i for i, r in enumerate(self._rows_by_index)}

        def collate(rows: Sequence[Example]) -> Batch:
            batch = prompt_batch(tokenizer, [r.instruction for r in rows], fmt)
            batch.update(choices_batch(tokenizer, [r.instruction for r in rows], [[r.response] for r in rows], fmt))
            batch["dataset"] = torch.tensor([SPLITS.index(r.dataset) for r in rows])  # (B,)
            batch["row"] = torch.tensor([index[id(r)] for r in rows])  # (B,)
            return batch

        return collate

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: evaluate() needs eval_collate_fn(tokenizer) to have been called")
        was_training = model.training
        model.eval()
        scores: dict[str, dict[str, list[float]]] = {s: {"acc": [], "rouge": [], "prob": []} for s in SPLITS}
        self.samples = []
        rows = self._rows_by_index
        try:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                for lo in range(0, batch["input_ids"].shape[0], self.eval_chunk):
                    hi = lo + self.eval_chunk
                    ids, mask = trim_left(batch["input_ids"][lo:hi], batch["attention_mask"][lo:hi])
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        new = greedy_generate(model, ids, mask, self.max_new_tokens, [self.tokenizer.eos_token_id],
                                              pad_id(self.tokenizer))  # (b, N)
                        logp = continuation_logprobs(model, *trim_left(batch["mc_input_ids"][lo:hi],
                                                                       batch["mc_attention_mask"][lo:hi]),
                                                     batch["mc_n"][lo:hi])  # (b,)
                    prob = (logp / batch["mc_n"][lo:hi]).exp().tolist()  # per-token geometric mean
                    texts = self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
                    for i, text in enumerate(texts):
                        row = rows[int(batch["row"][lo + i])]
                        split = scores[row.dataset]
                        split["acc"].append(float(contains_value(text, row.answer)))
                        split["rouge"].append(rouge_l_recall(text, row.response))
                        split["prob"].append(prob[i])
                        if len(self.samples) < 6:
                            self.samples.append({"dataset": row.dataset, "question": row.instruction,
                                                 "output": text, "gold": row.response})
        finally:
            model.train(was_training)
        return self.metrics_of(scores)

    def metrics_of(self, scores: dict[str, dict[str, list[float]]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for split, by in scores.items():
            for name, values in by.items():
                if name == "acc" and self.source != "offline":
                    continue  # TOFU's answers are sentences without a short value to look for
                out[f"{split}_{name}"] = sum(values) / len(values) if values else float("nan")
        basis = "acc" if self.source == "offline" else "rouge"
        out["unlearn_score"] = harmonic(1 - out[f"forget_{basis}"], out[f"retain_{basis}"])
        known = scores["forget"][basis] + scores["retain"][basis]
        out["known"] = sum(known) / len(known)  # the share of every eval fact the model still knows
        return out

    def _higher(self) -> dict[str, bool]:
        out = {f"{s}_{m}": s == "retain" for s in SPLITS for m in ("acc", "rouge", "prob")}
        return {**out, "unlearn_score": True, "known": True}


class TeachTask(FactsTask):
    """Fine-tune on every fact (forget and retain): the taught model an unlearning run starts from. Main metric
    `known`, the share of eval facts it answers (acc offline, rouge on TOFU)."""

    name = "unlearn/facts_teach"
    main_metric = "known"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.higher_is_better = self._higher()

    def _train_rows(self, seed: int) -> list[Example]:
        forget, retain = self.facts()
        return forget + retain  # the loader shuffles


class UnlearnTask(FactsTask):
    """Forget the forget set's facts, keep the retain set's: an unlearning objective from the taught model.

    Training rows are (forget, retain) pairs: max(|forget|, |retain|) of them, the forget rows in turn and the retain
    rows in a seeded order, so a pass covers both sets; batches put the forget rows under the model's keys and the
    retain rows under `retain_` keys (`objective` reads both).

    Args:
        objective: ga, gd or ihl (module docstring).
        retain_weight: w, the weight of the retain NLL (gd, ihl).
        teacher: how the taught model is trained: method, seed and overrides of its unlearn/facts_teach cell
            (bench/unlearn.py).
        (the rest as FactsTask)
    """

    name = "unlearn/facts"
    main_metric = "unlearn_score"

    def __init__(self, objective: str = "ihl", retain_weight: float = 1.0, teacher: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if objective not in OBJECTIVES:
            raise ValueError(f"task.objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        if float(retain_weight) < 0:
            raise ValueError(f"task.retain_weight must be >= 0; got {retain_weight}")
        self.objective_name, self.retain_weight = objective, float(retain_weight)
        self.teacher = dict(teacher or {})
        self.higher_is_better = self._higher()

    def _train_rows(self, seed: int) -> list[tuple[Example, Example]]:
        forget, retain = self.facts()
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(retain), generator=g).tolist()
        n = max(len(forget), len(retain))
        return [(forget[i % len(forget)], retain[order[i % len(retain)]]) for i in range(n)]

    def length(self, row: Any) -> int:
        if isinstance(row, tuple):  # a training pair
            return sum(super(UnlearnTask, self).length(r) for r in row)
        return super().length(row)

    def collate_fn(self, tokenizer: Any) -> Callable[[Sequence[tuple[Example, Example]]], Batch]:
        plain = super().collate_fn(tokenizer)  # also keeps the tokenizer for the probe and evaluation

        def collate(rows: Sequence[tuple[Example, Example]]) -> Batch:
            batch = plain([f for f, _ in rows])  # (B, T) input_ids, attention_mask, labels
            batch.update({RETAIN_PREFIX + k: v for k, v in plain([r for _, r in rows]).items()})  # (B, T')
            return batch

        return collate

    def objective(self, model: Callable[..., Any], batch: Batch) -> Objective:
        return objective_loss(model, batch, self.objective_name, self.retain_weight)
