"""Generative tasks on a causal LM: prompt formats, the response-only loss collate, batched greedy generation with a
KV cache, and log-likelihood multiple-choice scoring. tasks/gsm8k.py and tasks/commonsense.py build on it.

Prompt formats (`prompt_format`):
    chat          the tokenizer's chat template: the instruction is the user turn, the response the assistant turn.
    llm_adapters  the Alpaca-style template of LLM-Adapters (AGI-Edgerunners/LLM-Adapters
                  @ 816657208af4db747803f87ba40a4c71383fed7a; unchanged in NVlabs/DoRA
                  @ 7e2f10abbe8efe212c8fca1d983ae1d04ef13a18), byte for byte, whitespace included: finetune.py's
                  template for training rows, evaluate.py / commonsense_evaluate.py's for evaluation
                  (they differ: two vs one trailing space after "request.", 16 spaces vs none on the blank line).
    qa            "Question: {instruction}\nAnswer:" and the response after a space (the unlearning reference's
                  format for Phi; csm9493/efficient-llm-unlearning, TOFU/config/model_config.yaml): short rows.
    peft_metamath "Question: {instruction} Think step by step.\nAnswer:", PEFT's method comparison template
                  (huggingface/peft method_comparison/MetaMathQA), and the response after a space as qa (PEFT
                  appends the response with no separator; one space keeps the prompt/response token boundary).
    auto          chat when the tokenizer has a chat template, else llm_adapters.

Tokenisation: the prompt and the response are encoded separately and concatenated (as lm-eval does), so the loss
mask, the generation prompt and the scored continuation all meet at the same token boundary. LLM-Adapters instead
encodes prompt + response as one string and masks the length of the separately encoded prompt; the two agree except
where BPE merges across the boundary.

Loss masking: labels are -100 on prompt and padding tokens (train_on_inputs=False). LLM-Adapters' and DoRA's
finetune.py default is train_on_inputs=True (loss on the prompt too); the option reproduces it. A training row longer
than max_length keeps its response (up to max_length minus half the prompt) and loses the start of its prompt, so
every row has response tokens to learn from; the reference's cutoff_len cuts from the right, which can drop the
whole response of a long prompt (and a batch of such rows has no loss at all: NaN).

Forgetting probe: the mean token cross-entropy of the model on a fixed sample of general text that no generative
task trains on (offline: premises of the MNLI rows held out in tasks/data/glue, five genres of American English;
hub: WikiText-2's test split), measured before and after fine-tuning; the runner records both and their difference
(PEFT's method-comparison benchmark records the same signal).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tasks.base import Batch, HeadSpec, Task, load_hub_dataset, subset

PromptFormat = Literal["auto", "chat", "llm_adapters", "qa", "peft_metamath"]
Format = Literal["chat", "llm_adapters", "qa", "peft_metamath"]  # a resolved prompt format
FORMATS = ("chat", "llm_adapters", "qa", "peft_metamath")
Split = Literal["train", "eval", "validation"]
EvalMode = Literal["generate", "loglik"]

# finetune.py generate_prompt(data_point) with data_point["input"] == "", output appended after it
LLM_ADAPTERS_TRAIN_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    "                ### Instruction:\n                {instruction}\n                \n"
    "                ### Response:\n                "
)
# evaluate.py / commonsense_evaluate.py generate_prompt(instruction, input=None)
QA_PROMPT = "Question: {instruction}\nAnswer:"
# huggingface/peft method_comparison/MetaMathQA/default_training_params.json `query_template`
PEFT_METAMATH_PROMPT = "Question: {instruction} Think step by step.\nAnswer:"
QA_PROMPTS = {"qa": QA_PROMPT, "peft_metamath": PEFT_METAMATH_PROMPT}
LLM_ADAPTERS_EVAL_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    "                ### Instruction:\n                {instruction}\n\n"
    "                ### Response:\n                "
)


@dataclass(frozen=True)
class Example:
    """One row of a generative task.

    Attributes:
        instruction: the user's turn (GSM8K: the question; commonsense: LLM-Adapters' instruction with its options).
        response: the training target (GSM8K: the worked solution ending "#### N"; commonsense:
            "the correct answer is answer3").
        answer: the gold answer (GSM8K: the number after "####", thousands separators removed; commonsense: the label).
        dataset: the data set the row comes from ("gsm8k", "boolq", "ARC-Easy", ...).
        choices: candidate responses for log-likelihood scoring (empty when the task has none).
        gold: the index of the gold response in `choices` (-1 without choices).
    """

    instruction: str
    response: str
    answer: str
    dataset: str
    choices: tuple[str, ...] = ()
    gold: int = -1


# ---------------------------------------------------------------------------------------------- prompts and tokens


def resolve_format(tokenizer: Any, prompt_format: PromptFormat) -> Format:
    """`auto` is chat when the tokenizer has a chat template, else llm_adapters."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_chat else "llm_adapters"
    if prompt_format == "chat" and not has_chat:
        raise ValueError("prompt_format=chat, but the tokenizer has no chat template; use llm_adapters or auto")
    if prompt_format not in FORMATS:
        raise ValueError(f"prompt_format must be auto or one of {', '.join(FORMATS)}; got {prompt_format!r}")
    return prompt_format


def encode(tokenizer: Any, instruction: str, response: str | None, fmt: Format,
           split: Split) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the response (its end-of-turn / EOS included; [] when response is None)."""
    if fmt == "chat":
        user = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids  # the template writes its own specials
        if response is None:
            return prompt_ids, []
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template does not render the assistant turn after the generation prompt")
        return prompt_ids, tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
    if fmt in QA_PROMPTS:  # "Question: …\nAnswer:" (PEFT's: "… Think step by step.\nAnswer:") then " response" + EOS
        prompt_ids = tokenizer(QA_PROMPTS[fmt].format(instruction=instruction)).input_ids
        if response is None:
            return prompt_ids, []
        return prompt_ids, tokenizer(" " + response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    template = LLM_ADAPTERS_TRAIN_PROMPT if split == "train" else LLM_ADAPTERS_EVAL_PROMPT
    prompt_ids = tokenizer(template.format(instruction=instruction)).input_ids  # BOS if the tokenizer adds one
    if response is None:
        return prompt_ids, []
    return prompt_ids, tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad(seqs: Sequence[Sequence[int]], value: int, side: Literal["left", "right"]) -> torch.Tensor:
    """(B, T) long tensor of `seqs` padded with `value` to the longest, on the left or the right."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s) == 0:
            continue
        if side == "left":
            out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def fit_row(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Shorten a (prompt, response) pair to at most max_length tokens: the response keeps up to max_length minus
    half the prompt (or minus the whole prompt when shorter), and the prompt loses tokens from its start."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_response = min(len(response), max_length - min(len(prompt), max_length // 2))
    keep_prompt = max_length - keep_response
    return prompt[len(prompt) - keep_prompt:], response[:keep_response]


def lm_collate(tokenizer: Any, prompt_format: PromptFormat = "auto", max_length: int = 512,
               train_on_inputs: bool = False) -> Callable[[Sequence[Example]], Batch]:
    """Training batches: prompt + response, right-padded; labels -100 on the prompt (unless train_on_inputs) and on
    padding. Padding is masked by position, never by token id (a pad token may equal EOS, which is a label)."""
    fmt = resolve_format(tokenizer, prompt_format)
    pid = pad_id(tokenizer)

    def collate(rows: Sequence[Example]) -> Batch:
        ids, labels = [], []
        for r in rows:
            p, a = fit_row(*encode(tokenizer, r.instruction, r.response, fmt, "train"), max_length)
            ids.append(p + a)
            labels.append((p if train_on_inputs else [-100] * len(p)) + a)
        input_ids = pad(ids, pid, "right")  # (B, T)
        return {"input_ids": input_ids,
                "attention_mask": pad([[1] * len(s) for s in ids], 0, "right"),  # (B, T)
                "labels": pad(labels, -100, "right")}  # (B, T)

    return collate


def prompt_batch(tokenizer: Any, instructions: Sequence[str], fmt: Format) -> Batch:
    """Left-padded generation prompts: input_ids and attention_mask, (B, T)."""
    ids = [encode(tokenizer, ins, None, fmt, "eval")[0] for ins in instructions]
    return {"input_ids": pad(ids, pad_id(tokenizer), "left"),
            "attention_mask": pad([[1] * len(s) for s in ids], 0, "left")}


def choices_batch(tokenizer: Any, instructions: Sequence[str], choices: Sequence[Sequence[str]],
                  fmt: Format) -> Batch:
    """Every (prompt, candidate response) pair of a batch, left-padded so that the candidates end every row:
    mc_input_ids, mc_attention_mask (N, T); mc_n (N,) candidate tokens; mc_row (N,) the batch row it belongs to;
    mc_choice (N,) its index among that row's choices."""
    seqs, n, row, choice = [], [], [], []
    for i, (ins, cands) in enumerate(zip(instructions, choices)):
        for j, c in enumerate(cands):
            p, a = encode(tokenizer, ins, c, fmt, "eval")
            seqs.append(p + a)
            n.append(len(a))
            row.append(i)
            choice.append(j)
    return {"mc_input_ids": pad(seqs, pad_id(tokenizer), "left"),
            "mc_attention_mask": pad([[1] * len(s) for s in seqs], 0, "left"),
            "mc_n": torch.tensor(n), "mc_row": torch.tensor(row), "mc_choice": torch.tensor(choice)}


# ---------------------------------------------------------------------------------------------- model calls


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def trim_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded batch."""
    real = attention_mask.any(0).nonzero()
    start = int(real[0]) if len(real) else 0
    return input_ids[:, start:], attention_mask[:, start:]


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Greedy decoding of a left-padded batch with the KV cache: one prefill, then one token per step for every row.

    Returns the new tokens, (B, N) with N <= max_new_tokens: a row's first EOS is kept, `pad_token_id` follows it;
    decoding stops once every row has emitted an EOS.
    """
    batch = input_ids.shape[0]
    eos = torch.tensor(list(eos_token_ids), device=input_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)  # (B,)
    pos = positions(attention_mask)  # (B, T)
    ids, mask, past, new = input_ids, attention_mask, None, []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                    logits_to_keep=1)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        ids = token[:, None]  # (B, 1)
        pos = pos[:, -1:] + 1  # (B, 1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # (B, T + step)
    if not new:
        return input_ids.new_zeros(batch, 0)
    return torch.stack(new, dim=1)  # (B, N)


@torch.no_grad()
def continuation_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          n: torch.Tensor) -> torch.Tensor:
    """log p(last n[i] tokens of row i | the tokens before them), summed, for a left-padded batch. (N,)

    Only the logits that predict the scored tokens are computed (logits_to_keep): a forward costs no (N, T, V) tensor.
    """
    k = int(n.max())
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   logits_to_keep=k + 1).logits[:, :-1]  # (N, k, V): position t predicts token t + 1
    targets = input_ids[:, -k:]  # (N, k)
    logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (N, k)
    scored = torch.arange(k, device=n.device) >= (k - n)[:, None]  # (N, k): the last n[i] of each row
    return torch.where(scored, logp, torch.zeros_like(logp)).sum(-1)  # (N,)


def score_choices(model: nn.Module, tokenizer: Any, instruction: str, choices: Sequence[str],
                  prompt_format: PromptFormat = "auto") -> torch.Tensor:
    """Summed log-likelihood of each candidate response to one prompt, (C,); argmax is the model's choice."""
    fmt = resolve_format(tokenizer, prompt_format)
    b = choices_batch(tokenizer, [instruction], [choices], fmt)
    device = next(model.parameters()).device
    return continuation_logprobs(model, b["mc_input_ids"].to(device), b["mc_attention_mask"].to(device),
                                 b["mc_n"].to(device)).cpu()


# ---------------------------------------------------------------------------------------------- data sources

MNLI_HELDOUT = Path(__file__).resolve().parent / "data" / "glue" / "mnli" / "heldout_from_train_1k.json"
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")


def hub_rows(source: str, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
    """Rows of a data set on the hub (`datasets.load_dataset(source, name)`), or of a JSON file or URL
    (`source` ending in .json/.jsonl: load_dataset("json", data_files=source))."""
    offline = "use train_source=offline"
    if source.endswith((".json", ".jsonl")):
        data = load_hub_dataset("json", None, split, data_files=source, offline=offline)
    else:
        data = load_hub_dataset(source, name, split, offline=offline)
    return [dict(row) for row in data]


def probe_texts(source: str, samples: int, seed: int = 0) -> list[str]:
    """The forgetting probe's fixed sample of general text: `samples` paragraphs of at least 80 characters, chosen
    by a seeded shuffle. source: offline (MNLI premises held out in tasks/data/glue) or wikitext (hub)."""
    if source == "offline":
        rows = json.loads(MNLI_HELDOUT.read_text(encoding="utf-8")).values()
        texts = list(dict.fromkeys(r["text_a"].strip() for r in rows))  # 3 hypotheses share a premise
    elif source == "wikitext":
        texts = [r["text"].strip() for r in hub_rows(WIKITEXT[0], "test", WIKITEXT[1])]
    else:
        raise ValueError(f"probe_source must be offline or wikitext; got {source!r}")
    texts = [t for t in texts if len(t) >= 80]
    if len(texts) < samples:
        raise ValueError(f"the forgetting probe asks for {samples} texts; {source} has {len(texts)} of >= 80 chars")
    return subset(texts, samples, seed)


@torch.no_grad()
def mean_token_ce(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int,
                  device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    """Cross-entropy per token (nats) of `texts` under `model`, pooled over all their tokens (first max_length of
    each; the first token of a text is context only)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for lo in range(0, len(texts), batch_size):
            ids = [tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts[lo:lo + batch_size]]
            input_ids = pad(ids, pad_id(tokenizer), "right").to(device)  # (B, T)
            mask = pad([[1] * len(s) for s in ids], 0, "right").to(device)  # (B, T)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            targets = input_ids[:, 1:]  # (B, T-1)
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            scored = mask[:, 1:].bool()  # (B, T-1): real next tokens only
            total += float(ce[scored].sum())
            count += int(scored.sum())
    finally:
        model.train(was_training)
    return total / count


# ---------------------------------------------------------------------------------------------- the task base


class GenerativeTask(Task):
    """A task whose model is a causal LM trained on prompt → response, scored by generation or log-likelihood.

    Subclasses load rows (`_load`) and judge generations (`judge`); `datasets` names the data sets rows come from
    (metrics are reported per data set when there are several).

    Args:
        prompt_format: auto, chat or llm_adapters (see the module docstring).
        max_length: tokens per training row (prompt + response), truncated from the right.
        max_new_tokens: greedy generation budget per eval row.
        eval_mode: generate (greedy generation, then answer extraction) or loglik (the candidate response with the
            highest summed log-likelihood; only for tasks with choices).
        eval_chunk: eval rows per forward/generation call (bounds the KV cache); batches are split into chunks.
        train_on_inputs: also train on the prompt tokens (LLM-Adapters' default); False: response-only loss.
        max_train_samples: a seeded random subset of train (null: all).
        max_eval_samples: a fixed random subset of eval, per data set (null: all).
        eval_subset_seed: the seed of the eval subset, fixed so that every run scores the same rows.
        train_source: offline (the copies in tasks/data), or a hub data set id / JSON URL in the format the
            subclass names (GSM8K: MetaMathQA's; commonsense: commonsense_170k's).
        probe_samples: texts in the forgetting probe (0 turns it off).
        probe_source: offline (MNLI premises) or wikitext (hub).
        probe_max_length: tokens per probe text.
    """

    datasets: tuple[str, ...]

    def __init__(self, prompt_format: PromptFormat = "auto", max_length: int = 512, max_new_tokens: int = 256,
                 eval_mode: EvalMode = "generate", eval_chunk: int = 16, train_on_inputs: bool = False,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 eval_subset_seed: int = 0, train_source: str = "offline", probe_samples: int = 64,
                 probe_source: str = "offline", probe_max_length: int = 128) -> None:
        if eval_mode not in ("generate", "loglik"):
            raise ValueError(f"eval_mode must be generate or loglik; got {eval_mode!r}")
        if prompt_format != "auto" and prompt_format not in FORMATS:
            raise ValueError(f"prompt_format must be auto or one of {', '.join(FORMATS)}; got {prompt_format!r}")
        self.head = HeadSpec(kind="causal_lm", num_labels=0)  # type: ignore[arg-type]  # see the proposed base.py diff
        self.prompt_format, self.max_length, self.max_new_tokens = prompt_format, int(max_length), int(max_new_tokens)
        self.eval_mode, self.eval_chunk, self.train_on_inputs = eval_mode, int(eval_chunk), bool(train_on_inputs)
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.eval_subset_seed = eval_subset_seed
        if probe_samples < 0 or probe_max_length < 2:
            raise ValueError("probe_samples must be >= 0 (0: no probe) and probe_max_length >= 2")
        if probe_source not in ("offline", "wikitext"):
            raise ValueError(f"probe_source must be offline or wikitext; got {probe_source!r}")
        self.train_source = str(train_source)
        self.probe_samples, self.probe_source, self.probe_max_length = int(probe_samples), probe_source, int(probe_max_length)
        self.tokenizer: Any = None  # set by collate_fn / eval_collate_fn; evaluate() decodes with it
        self.samples: list[dict[str, Any]] = []  # the first rows of the last evaluation: prompt, output, prediction

    # -------------------------------------------------------------- what subclasses provide
    def _load(self, split: Split) -> list[Example]:
        raise NotImplementedError

    def _eval_rows(self) -> list[Example]:
        """All eval rows, subset per data set (max_eval_samples each)."""
        rows = self._load("eval")
        by_set: dict[str, list[Example]] = {}
        for r in rows:
            by_set.setdefault(r.dataset, []).append(r)
        return [r for name in self.datasets if name in by_set
                for r in subset(by_set[name], self.max_eval_samples, self.eval_subset_seed)]

    def gold(self, row: Example) -> float:
        """The gold answer as a number, carried by eval batches (GSM8K: the value; commonsense: the label index)."""
        raise NotImplementedError

    def judge(self, text: str, dataset: str, gold: float) -> tuple[bool, str]:
        """(correct, extracted prediction) for a generated text."""
        raise NotImplementedError

    @torch.no_grad()
    def forgetting_probe(self, model: nn.Module, device: torch.device,
                         autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """{"forget_ce": mean token cross-entropy on the probe texts}; {} when probe_samples is 0."""
        if not self.probe_samples:
            return {}
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: the forgetting probe needs collate_fn(tokenizer) to have been called")
        texts = probe_texts(self.probe_source, self.probe_samples)
        return {"forget_ce": mean_token_ce(model, self.tokenizer, texts, self.probe_max_length, self.eval_chunk,
                                           device, autocast_dtype)}

    # -------------------------------------------------------------- the Task contract
    def examples(self, split: Split, seed: int = 0) -> list[Example]:
        if split in ("train", "validation"):
            return self.train_split(self._load("train"), split, self.max_train_samples, seed)
        return self._eval_rows()

    def length(self, row: Example) -> int:
        return len(row.instruction) + len(row.response)

    def collate_fn(self, tokenizer: Any) -> Callable[[Sequence[Example]], Batch]:
        self.tokenizer = tokenizer
        return lm_collate(tokenizer, self.prompt_format, self.max_length, self.train_on_inputs)

    def eval_collate_fn(self, tokenizer: Any) -> Callable[[Sequence[Example]], Batch]:
        """Eval batches: left-padded prompts (generate) or every prompt + candidate (loglik), with the gold answers:
        gold (B,) float64 (generate: self.gold(row); loglik: the index of the gold choice) and dataset (B,) the index
        of the row's data set in `datasets`."""
        self.tokenizer = tokenizer
        fmt = resolve_format(tokenizer, self.prompt_format)

        def collate(rows: Sequence[Example]) -> Batch:
            if self.eval_mode == "loglik":
                if any(not r.choices for r in rows):
                    raise ValueError(f"{self.name}: eval_mode=loglik needs candidate responses, and a row has none")
                batch = choices_batch(tokenizer, [r.instruction for r in rows], [r.choices for r in rows], fmt)
            else:
                batch = prompt_batch(tokenizer, [r.instruction for r in rows], fmt)
            gold = [r.gold for r in rows] if self.eval_mode == "loglik" else [self.gold(r) for r in rows]
            batch["gold"] = torch.tensor(gold, dtype=torch.float64)  # (B,)
            batch["dataset"] = torch.tensor([self.datasets.index(r.dataset) for r in rows])  # (B,)
            return batch

        return collate

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: evaluate() needs eval_collate_fn(tokenizer) to have been called")
        was_training = model.training
        model.eval()
        correct: list[tuple[int, bool]] = []  # (dataset index, correct) per row
        self.samples = []

        def autocast() -> torch.autocast:
            return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

        try:
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                if "mc_input_ids" in batch:
                    with autocast():
                        correct += self._score_choices(model, batch)
                    continue
                for lo in range(0, batch["input_ids"].shape[0], self.eval_chunk):
                    ids, mask = trim_left(batch["input_ids"][lo:lo + self.eval_chunk],
                                          batch["attention_mask"][lo:lo + self.eval_chunk])
                    with autocast():
                        new = greedy_generate(model, ids, mask, self.max_new_tokens, [self.tokenizer.eos_token_id],
                                              pad_id(self.tokenizer))  # (b, N)
                    texts = self.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
                    for i, text in enumerate(texts):
                        d, g = int(batch["dataset"][lo + i]), float(batch["gold"][lo + i])
                        ok, pred = self.judge(text, self.datasets[d], g)
                        correct.append((d, ok))
                        if len(self.samples) < 5:
                            self.samples.append({"dataset": self.datasets[d], "output": text, "prediction": pred,
                                                 "gold": g, "correct": ok})
        finally:
            model.train(was_training)
        return self.metrics(correct)

    def _score_choices(self, model: nn.Module, batch: Batch) -> list[tuple[int, bool]]:
        rows = batch["gold"].shape[0]
        scores = torch.cat([
            continuation_logprobs(model, *trim_left(batch["mc_input_ids"][lo:lo + self.eval_chunk],
                                                    batch["mc_attention_mask"][lo:lo + self.eval_chunk]),
                                  batch["mc_n"][lo:lo + self.eval_chunk])
            for lo in range(0, batch["mc_input_ids"].shape[0], self.eval_chunk)])  # (N,)
        out = []
        for i in range(rows):
            mine = batch["mc_row"] == i  # (N,)
            pick = int(batch["mc_choice"][mine][scores[mine].argmax()])
            out.append((int(batch["dataset"][i]), pick == int(batch["gold"][i])))
        return out

    def chance(self, rows: Sequence[Example]) -> dict[str, float]:
        """Per data set, the share of its rows whose gold answer is the set's most frequent one (the best constant
        answer: "yes" on BoolQ, a choice letter, a number on GSM8K), aggregated as `metrics` aggregates scores."""
        correct: list[tuple[int, bool]] = []
        for d, name in enumerate(self.datasets):
            golds = [self.gold(r) for r in rows if r.dataset == name]
            if golds:
                common = max(set(golds), key=golds.count)
                correct += [(d, g == common) for g in golds]
        return self.metrics(correct) if correct else {}

    def metrics(self, correct: list[tuple[int, bool]]) -> dict[str, float]:
        """The main metric: the mean over data sets of the fraction correct (the plain fraction for one data set);
        with several data sets also `<main>/<data set>` for each."""
        per: dict[str, float] = {}
        for d, name in enumerate(self.datasets):
            hits = [ok for i, ok in correct if i == d]
            if hits:
                per[name] = sum(hits) / len(hits)
        out = {self.main_metric: sum(per.values()) / len(per) if per else float("nan")}
        if len(self.datasets) > 1:
            out.update({f"{self.main_metric}/{name}": v for name, v in per.items()})
        return out
