"""Preference pairs (objective dpo, orpo): formats, checks, tokenization (only the final answer trained, the prompt
shared), the pass and the cache, packing whole pairs, and the batches a preference loss reads."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from kubetune_api import EXIT_DATA_INVALID, DataFormat
from kubetune_trainer.data import (
    IGNORE,
    Example,
    PackedPairs,
    PreferencePair,
    blank_pairs,
    collate_pairs,
    detect_format,
    pair_examples,
    pair_size,
    tokenize_dataset,
    tokenize_pair,
    validate_dataset,
)
from kubetune_trainer.data.cache import Cache, SplitWriter, write_meta
from kubetune_trainer.data.preference import tokenize_pairs
from kubetune_trainer.errors import DatasetError

from tests.datafixtures import CHAT, COMPLETION, tiny_tokenizer, write_jsonl
from tests.trainer.test_data import trained_spans

FMT = DataFormat
NAME = "s3://bucket/pairs.jsonl"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


PROMPT = [{"role": "system", "content": "You are a helpful assistant."}, user("What is the capital of France?"),
          assistant("Paris."), user("And of Italy?")]
STRINGS = {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Rome."}
MESSAGES = {"prompt": PROMPT, "chosen": [assistant("Rome, of course.")], "rejected": assistant("Milan.")}
IMPLICIT = {"chosen": PROMPT + [assistant("Rome, of course.")], "rejected": PROMPT + [assistant("Milan.")]}
OPENAI = {"input": {"messages": PROMPT}, "preferred_output": [assistant("Rome, of course.")],
          "non_preferred_output": [assistant("Milan.")]}


def prompt_ids(example: Example) -> list[int]:
    """The tokens before the first trained one."""
    return example.input_ids[:next(i for i, label in enumerate(example.labels) if label != IGNORE)]


# --- tokenization -------------------------------------------------------------------------------------------


def test_a_string_pair_is_tokenized_like_two_completions(tok):
    chosen, rejected = tokenize_pair(STRINGS, FMT.preference, tok, 512)
    assert trained_spans(chosen, tok) == [" Paris.</s>"] and trained_spans(rejected, tok) == [" Rome.</s>"]
    assert prompt_ids(chosen) == prompt_ids(rejected) == [tok.bos_token_id] + tok(
        STRINGS["prompt"], add_special_tokens=False)["input_ids"]
    assert chosen.labels[0] == rejected.labels[0] == IGNORE


@pytest.mark.parametrize("record, fmt", [(MESSAGES, FMT.preference), (IMPLICIT, FMT.preference),
                                         (OPENAI, FMT.openai_preference)], ids=["messages", "implicit", "openai"])
def test_a_chat_pair_trains_only_the_final_answer(tok, record, fmt):
    chosen, rejected = tokenize_pair(record, fmt, tok, 512)
    assert trained_spans(chosen, tok) == ["Rome, of course.<|im_end|>"]  # not the earlier "Paris." turn
    assert trained_spans(rejected, tok) == ["Milan.<|im_end|>"]
    head = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(chosen) == prompt_ids(rejected) == tok(head, add_special_tokens=False)["input_ids"]
    assert tok.decode(chosen.input_ids) == tok.apply_chat_template(PROMPT + [assistant("Rome, of course.")],
                                                                   tokenize=False)


@pytest.mark.parametrize("template, answer", [
    # Qwen3-like: the last assistant turn is rendered differently from earlier ones
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and loop.last %}<think></think>"
     "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
     "{% endif %}", "<think></think>Rome, of course.<|im_end|>"),
    # the generation prompt is not how answered turns start: the answer is found in the rendering
    ("{% for m in messages %}<|im_start|>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}"
     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "Rome, of course.<|im_end|>"),
], ids=["rerendered-last-turn", "other-generation-prompt"])
def test_other_chat_templates_train_only_the_final_answer(tok, template, answer):
    other = copy.deepcopy(tok)
    other.chat_template = template
    chosen, rejected = tokenize_pair(MESSAGES, FMT.preference, other, 512)
    assert trained_spans(chosen, other) == [answer]
    assert len(trained_spans(rejected, other)) == 1 and "Milan." in trained_spans(rejected, other)[0]
    assert prompt_ids(chosen) == prompt_ids(rejected)
    assert other.decode(prompt_ids(chosen)).endswith("And of Italy?<|im_end|>\n<|im_start|>" + (
        "assistant\n" if "think" in answer else "model\n"))


def test_every_form_gives_the_same_tokens(tok):
    expected = tokenize_pair(MESSAGES, FMT.preference, tok, 512)
    assert tokenize_pair(IMPLICIT, FMT.preference, tok, 512) == expected
    assert tokenize_pair(OPENAI, FMT.openai_preference, tok, 512) == expected
    short = tokenize_pair(MESSAGES, FMT.preference, tok, 30)
    assert short == tuple(Example(e.input_ids[:30], e.labels[:30]) for e in expected)


# --- detection and the pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("record, fmt", [
    (STRINGS, FMT.preference), (MESSAGES, FMT.preference), (IMPLICIT, FMT.preference),
    ({"prompt": "p", "chosen": "a"}, FMT.preference), ({**STRINGS, "messages": []}, FMT.preference),
    (OPENAI, FMT.openai_preference), ({**OPENAI, **STRINGS}, FMT.openai_preference),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_the_pass_counts_pairs_and_the_tokens_of_both_sequences(tmp_path, tok):
    records = [STRINGS, MESSAGES, IMPLICIT]  # one format (preference), in its string and chat forms
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", records), NAME, fmt=FMT.auto, tokenizer=tok,
                              max_seq_length=512, pairs=True)
    examples = [e for r in records for e in tokenize_pair(r, FMT.preference, tok, 512)]
    assert (report.format, report.samples, report.truncated) == (FMT.preference, 3, 0)
    assert report.tokens == sum(len(e) for e in examples) and report.max_length == max(len(e) for e in examples)
    assert report.trained_tokens == sum(e.trained_tokens for e in examples)
    path = write_jsonl(tmp_path / "o.jsonl", [OPENAI, OPENAI])
    assert validate_dataset(path, NAME, fmt=FMT.auto, tokenizer=tok, max_seq_length=512, pairs=True).format == \
        FMT.openai_preference
    assert tokenize_dataset(path, NAME, fmt=FMT.openai_preference, tokenizer=tok, max_seq_length=512,
                            pairs=True) == list(tokenize_pair(OPENAI, FMT.openai_preference, tok, 512)) * 2


def test_long_pairs_are_truncated_counted_and_named(tmp_path, tok):
    long = {**STRINGS, "rejected": " Rome is the capital of Italy." * 20}
    path = write_jsonl(tmp_path / "d.jsonl", [STRINGS, long, STRINGS, long])
    report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=32, pairs=True)
    assert (report.samples, report.truncated) == (4, 2) and report.max_length > 32
    assert len(report.warnings) == 1 and "2 of 4 records" in report.warnings[0]
    assert "line 2, line 4" in report.warnings[0]
    lengths = [len(e) for e in tokenize_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=32,
                                                pairs=True)]
    assert lengths[3] == lengths[7] == 32 and lengths[2] < 32


# --- the shapes TRL accepts: the prompt extracted as TRL's maybe_extract_prompt does ---------------------------

HH = {"chosen": "\n\nHuman: Why is the sky blue?\n\nAssistant: Rayleigh scattering: blue light scatters most.",
      "rejected": "\n\nHuman: Why is the sky blue?\n\nAssistant: Because it reflects the sea."}
HH_TURNS = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant: Teal",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant: No."}
ULTRAFEEDBACK = {"prompt": "And of Italy?", "prompt_id": "3f2a", "score_chosen": 9.0, "score_rejected": 4.5,
                 "chosen": PROMPT + [assistant("Rome, of course.")], "rejected": PROMPT + [assistant("Milan.")],
                 "messages": PROMPT + [assistant("Rome, of course.")]}


@pytest.mark.parametrize("record", [HH, HH_TURNS, ULTRAFEEDBACK, IMPLICIT, STRINGS, MESSAGES],
                         ids=["hh-rlhf", "hh-rlhf-turns", "ultrafeedback", "implicit", "strings", "messages"])
def test_the_prompt_and_answers_are_trls(record):
    """HH-RLHF as shipped (whole dialogues as strings) and UltraFeedback-binarized (a string prompt beside whole
    conversations) train, split as TRL's maybe_extract_prompt splits them; records with their prompt keep it."""
    from kubetune_trainer.data.formats import preference_pair
    from trl.data_utils import maybe_extract_prompt

    assert detect_format(record) == FMT.preference
    ours = preference_pair(copy.deepcopy(record), FMT.preference)
    trls = maybe_extract_prompt(copy.deepcopy(record))
    assert ours.prompt == trls["prompt"]
    for answer, theirs in ((ours.chosen, trls["chosen"]), (ours.rejected, trls["rejected"])):
        if isinstance(theirs, list):  # a conversation's answer: TRL keeps the array of its one message
            theirs = theirs[0] if len(theirs) == 1 else theirs
        assert answer == theirs


def test_hh_rlhf_texts_train_the_answers_after_the_shared_dialogue(tmp_path, tok):
    """The prompt (every turn up to the last "Assistant:") gets no loss; each answer, its space first, does."""
    path = write_jsonl(tmp_path / "hh.jsonl", [HH, HH_TURNS])
    chosen, rejected, *_ = tokenize_dataset(path, NAME, fmt=FMT.auto, tokenizer=tok, max_seq_length=256, pairs=True)
    split = HH["chosen"].index(" Rayleigh")
    assert tok.decode(prompt_ids(chosen), skip_special_tokens=True) == HH["chosen"][:split]
    assert prompt_ids(chosen) == prompt_ids(rejected)
    assert validate_dataset(path, NAME, fmt=FMT.auto, tokenizer=tok, max_seq_length=256, pairs=True).samples == 2


# --- bad records: the first problem, with file and line ------------------------------------------------------


def pair(prompt, chosen, rejected) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


BAD = {
    "rejected missing": ([STRINGS, {"prompt": "p", "chosen": "a"}], 2,
                         "missing field 'rejected' required by format preference"),
    "empty chosen": ([pair("p", " ", "b")], 1, "field 'chosen' is empty"),
    "empty prompt": ([pair("", "a", "b")], 1, "field 'prompt' is empty"),
    "null rejected": ([pair("p", "a", None)], 1, "field 'rejected' is null, expected a string"),
    "same answers": ([STRINGS, pair("p", "same ", "same")], 2, "'chosen' and 'rejected' are the same answer"),
    "same chat answers": ([pair([user("Hi")], assistant("A"), [assistant("A")])], 1,
                          "'chosen' and 'rejected' are the same answer"),
    "string prompt, message answer": ([pair("p", [assistant("a")], "b")], 1,
                                      "field 'prompt' is a string but 'chosen' is an array"),
    "message prompt, string answer": ([pair([user("Hi")], assistant("a"), "b")], 1,
                                      "'rejected' is a string but 'prompt' holds chat messages"),
    "prompt ends with the assistant": ([pair([user("Hi"), assistant("Hello")], assistant("a"), assistant("b"))], 1,
                                       "prompt: message 2 (assistant) is the last before the answer; it must be a "
                                       "user turn"),
    "bad role in the prompt": ([pair([{"role": "bot", "content": "Hi"}], assistant("a"), assistant("b"))], 1,
                               "prompt: message 1 has role 'bot'"),
    "empty prompt messages": ([pair([], assistant("a"), assistant("b"))], 1, "'prompt' must be a non-empty array"),
    "two answer messages": ([pair([user("Hi")], [assistant("a"), assistant("b")], assistant("b"))], 1,
                            "'chosen' has 2 messages, expected one assistant message"),
    "answer of the user": ([pair([user("Hi")], assistant("a"), user("b"))], 1,
                           "'rejected' has role 'user', expected assistant"),
    "empty answer content": ([pair([user("Hi")], assistant(""), assistant("b"))], 1, "'chosen' has empty content"),
    "implicit: differing prompts": ([{"chosen": [user("Hi"), assistant("a")],
                                      "rejected": [user("Yo"), assistant("b")]}], 1,
                                    "'chosen' and 'rejected' differ at message 1"),
    "implicit: lengths": ([{**IMPLICIT, "rejected": [user("Hi"), assistant("b")]}], 1,
                          "'chosen' has 5 messages and 'rejected' 2"),
    "implicit: texts sharing no prompt": ([{"chosen": "a", "rejected": "b"}], 1, "'chosen' and 'rejected' share no "
                                          "prompt (they differ from the start)"),
    "implicit: one text the start of the other": ([{"chosen": "Human: hi Assistant: yes",
                                                    "rejected": "Human: hi Assistant: yes, sure"}], 1,
                                                  "one is the start of the other"),
    "implicit: a text and a conversation": ([{"chosen": "Human: hi", "rejected": [user("hi"), assistant("b")]}], 1,
                                            "field 'chosen' is a string but the other answer is not"),
    "implicit: no prompt turns": ([{"chosen": [assistant("a")], "rejected": [assistant("b")]}], 1,
                                  "field 'chosen' has 1 message(s)"),
    "implicit: last not the assistant's": ([{"chosen": [user("Hi"), assistant("a")],
                                             "rejected": [user("Hi"), user("b")]}], 1,
                                           "the last message of 'rejected' has role 'user', expected assistant"),
    "openai: input": ([{**OPENAI, "input": "Hi"}], 1, "field 'input' is a string without 'messages'"),
    "openai: no output": ([{**OPENAI, "preferred_output": []}], 1, "'preferred_output' has 0 messages"),
    "openai: prompt": ([{**OPENAI, "input": {"messages": [user("")]}}], 1,
                       "input.messages: message 1 (user) has empty content"),
    "another format": ([STRINGS, STRINGS, COMPLETION], 3, "record is completion but the first record (line 1) is "
                       "preference"),
    "prompt too long": ([STRINGS, pair("word " * 200, "a", "b")], 2,
                        "no trained tokens left after truncation to maxSeqLength 64 (prompt + chosen has"),
}


@pytest.mark.parametrize("records, line, problem", BAD.values(), ids=BAD.keys())
def test_bad_pairs_are_refused_with_file_line_and_problem(tmp_path, tok, records, line, problem):
    assert_bad(write_jsonl(tmp_path / "d.jsonl", records), tok, line, problem, pairs=True)


def test_pairs_need_objective_dpo_or_orpo_and_dpo_needs_pairs(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [STRINGS])
    error = assert_bad(path, tok, 1, "records are preference pairs (preference: chosen and rejected answers) but "
                       "objective sft trains on one answer per record", pairs=False)
    assert "set objective dpo or orpo" in error.hint
    error = assert_bad(write_jsonl(tmp_path / "c.jsonl", [CHAT]), tok, 1,
                       "records are chat, not preference pairs: objective dpo and orpo train on", pairs=True)
    assert "set objective sft" in error.hint


def assert_bad(path, tok, line, problem, pairs) -> DatasetError:
    for check in (validate_dataset, tokenize_dataset):
        with pytest.raises(DatasetError) as e:
            check(path, NAME, fmt=FMT.auto, tokenizer=tok, max_seq_length=64, pairs=pairs)
        error = e.value
        assert (error.exit_code, error.file, error.line) == (EXIT_DATA_INVALID, NAME, line)
        assert problem in error.problem and error.hint
        assert str(error).startswith(f"{NAME}:{line}: ")
    return error


# --- the cache and packing ----------------------------------------------------------------------------------


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs in the string and chat forms, some answers longer than 96 tokens."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    out = []
    for i in range(n):
        chosen, rejected = words(1, 40 if i % 7 == 0 else 6), words(1, 6) + "!"
        if i % 2:
            out.append(pair(words(1, 5), " " + chosen, " " + rejected))
        else:
            prompt = [user(words(1, 5))] + ([assistant(words(1, 3)), user(words(1, 3))] if i % 4 == 0 else [])
            out.append(pair(prompt, assistant(chosen), [assistant(rejected)]))
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_the_cache_gives_what_tokenizing_in_memory_gives(tmp_path, tok, packing):
    path = write_jsonl(tmp_path / "train.jsonl", random_pairs(60))
    writer = SplitWriter(tmp_path / "cache" / "train")
    report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=96, sink=writer.add,
                              pairs=True)
    report.sequences = writer.close(96, packing, seed=3, pairs=True)
    write_meta(tmp_path / "cache", "key", {}, {"train": report})
    cache = Cache(tmp_path / "cache")
    cached = cache.sequences("train")
    expected = pair_examples(tokenize_pairs(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=96), 96,
                             packing, seed=3)
    assert report.truncated > 0 and report.samples == 60
    assert len(cached) == len(expected) == report.sequences == (len(expected) if packing else 60)
    assert list(cached) == expected and list(cache.sequences("train")) == expected
    assert list(cached[1:3]) == expected[1:3]
    assert all(isinstance(item, PackedPairs if packing else PreferencePair) for item in cached)
    assert sum(pair_size(item)[1] for item in cached) == 60
    assert sum(pair_size(item)[0] for item in cached) == report.tokens


def test_the_pass_over_pairs_is_the_same_on_two_workers(tmp_path, tok):
    values = random_pairs(1100)  # three chunks of the pass
    path = write_jsonl(tmp_path / "train.jsonl", values)
    written = []
    for workers in (1, 2):
        writer = SplitWriter(tmp_path / f"cache-{workers}")
        report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=96, sink=writer.add,
                                  workers=workers, pairs=True)
        writer.close(96, packing=False, seed=None, pairs=True)
        assert report.samples == 1100
        written.append([(tmp_path / f"cache-{workers}" / f"{n}.bin").read_bytes() for n in ("ids", "trained")])
    assert written[0] == written[1]
    values[1000] = pair("p", "same", "same")
    path = write_jsonl(tmp_path / "bad.jsonl", values)
    with pytest.raises(DatasetError) as e:
        validate_dataset(path, NAME, fmt=FMT.auto, tokenizer=tok, max_seq_length=96, workers=2, pairs=True)
    assert (e.value.line, e.value.problem) == (1001, "'chosen' and 'rejected' are the same answer")


def fake_pairs(n: int, seed: int = 0) -> list[Example]:
    """Examples in pair order whose ids tell their pair (1000 x pair) and side (100 x side); prompt untrained."""
    rng = random.Random(seed)
    out = []
    for p in range(n):
        prompt = rng.randint(1, 20)
        for side in range(2):
            ids = [1000 * p + 100 * side + j for j in range(prompt + rng.randint(1, 30))]
            out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def test_packing_keeps_pairs_whole_within_twice_max_seq_length():
    examples = fake_pairs(100)
    packed = pair_examples(examples, 50, packing=True, seed=1)
    assert len(packed) < 100 and pair_examples(examples, 50, packing=True, seed=1) == packed
    seen = []
    for row in packed:
        assert len(row) <= 100 and len(row.labels) == len(row.position_ids) == sum(row.lengths) == len(row)
        assert len(row.lengths) % 2 == 0 and pair_size(row) == (len(row), len(row.lengths) // 2)
        start = 0
        for k, size in enumerate(row.lengths):
            piece = slice(start, start + size)
            p, side = divmod(row.input_ids[start] // 100, 10)
            assert side == k % 2  # chosen, rejected, chosen, ...
            original = examples[2 * p + side]
            assert row.input_ids[piece] == original.input_ids and row.labels[piece] == original.labels
            assert row.position_ids[piece] == list(range(size)) and row.labels[start] == IGNORE
            seen += [p] if side == 0 else []
            start += size
    assert sorted(seen) == list(range(100))
    assert pair_examples(examples, 50, packing=False) == [PreferencePair(c, r)
                                                         for c, r in zip(examples[::2], examples[1::2], strict=True)]
    with pytest.raises(ValueError):
        pair_examples(examples, 40, packing=False)  # a sequence longer than max_seq_length


def sequence_sums(batch: dict) -> list[int]:
    """Trained tokens per sequence, summed the way a preference loss sums log-probabilities."""
    sequence, labels = batch["sequence"][:, 1:], batch["labels"][:, 1:]
    mask = labels != IGNORE
    totals = torch.zeros(int(batch["sequence"].max()) + 1, dtype=torch.long)
    return totals.scatter_add_(0, sequence[mask], torch.ones_like(sequence[mask])).tolist()


def test_collate_unpacked_pairs():
    c0, r0 = Example([5, 6, 7], [IGNORE, 6, 7]), Example([5, 8], [IGNORE, 8])
    c1, r1 = Example([9, 1, 2, 3], [IGNORE, IGNORE, 2, 3]), Example([9, 1, 4], [IGNORE, IGNORE, 4])
    batch = collate_pairs([PreferencePair(c0, r0), PreferencePair(c1, r1)], pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sequence"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [9, 1, 2, 3], [9, 1, 4, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 8, IGNORE, IGNORE],
                                        [IGNORE, IGNORE, 2, 3], [IGNORE, IGNORE, 4, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["sequence"].tolist() == [[0, 0, 0, -1], [1, 1, -1, -1], [2, 2, 2, 2], [3, 3, 3, -1]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert sequence_sums(batch) == [2, 1, 2, 1] and (int(batch["sequence"].max()) + 1) // 2 == 2


def test_collate_packed_pairs():
    examples = fake_pairs(9, seed=2)
    packed = pair_examples(examples, 50, packing=True)
    batch = collate_pairs(packed, pad_token_id=0)
    rows, width = len(packed), max(len(p) for p in packed)
    assert set(batch) == {"input_ids", "labels", "position_ids", "sequence"}
    assert all(t.shape == (rows, width) and t.dtype == torch.long for t in batch.values())
    order = []  # the sequences of the batch in order: row by row, chosen then rejected of each pair
    for p in packed:
        start = 0
        for k, size in enumerate(p.lengths):
            order.append(examples[2 * (p.input_ids[start] // 1000) + k % 2])
            start += size
    assert sequence_sums(batch) == [e.trained_tokens for e in order]  # numbered across rows, chosen even
    for r, p in enumerate(packed):
        numbers = batch["sequence"][r].tolist()
        assert numbers[len(p):] == [-1] * (width - len(p))
        assert batch["position_ids"][r].tolist() == p.position_ids + list(range(width - len(p)))
        assert batch["labels"][r, len(p):].eq(IGNORE).all() and batch["input_ids"][r, len(p):].eq(0).all()
    assert (int(batch["sequence"].max()) + 1) // 2 == 9
    with pytest.raises(ValueError):
        collate_pairs([packed[0], PreferencePair(examples[0], examples[1])], 0)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_blank_batch_is_shaped_like_one_item_and_trains_nothing(packing):
    item = pair_examples(fake_pairs(2), 64, packing=packing)[0]
    batch, blank = collate_pairs([item], 0), blank_pairs(item, 0)
    assert {k: v.shape for k, v in blank.items()} == {k: v.shape for k, v in batch.items()}
    assert blank["labels"].eq(IGNORE).all() and blank["sequence"].eq(-1).all()
    assert (int(blank["sequence"].max()) + 1) // 2 == 0
    assert torch.equal(blank["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("objective, k", [("dpo", 6), ("orpo", 4)])
def test_the_data_report_counts_pair_rows_and_the_reference_pass(monkeypatch, objective, k):
    from types import SimpleNamespace

    from kubetune_api import TrainerConfig
    from kubetune_trainer.data import report as report_module
    from kubetune_trainer.data.validate import DatasetReport

    config = TrainerConfig.model_validate({
        "jobName": "pairs", "objective": objective, "baseModel": {"uri": "/model"}, "dataset": {"train": "/data"},
        "output": {"uri": "/out"}, "hyperparameters": {"maxSeqLength": 64, "packing": True}})
    config = config.model_copy(update={"hardware": config.hardware.model_copy(update={"gpus": 1})})
    monkeypatch.setattr(report_module, "count_parameters", lambda model_dir, task: 1000)
    train = DatasetReport("train", FMT.preference, samples=100, tokens=6400, trained_tokens=2000, truncated=0,
                          max_length=60, sequences=80)
    doc = report_module.data_report(config, SimpleNamespace(unit="sample"), {"train": train}, "/model")
    assert doc["packingEfficiency"] == 6400 / (80 * 2 * 64)  # a row holds 2 x maxSeqLength tokens
    # LoRA: 4 N T, and 2 N T more for DPO's reference model
    assert doc["estimate"]["flops"] == pytest.approx(k * 1000 * doc["estimate"]["tokens"], rel=1e-3)
