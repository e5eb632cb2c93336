"""The trainer's data stage: formats, validation errors, loss masks, packing, collation and the tokenizer."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from kubetune_api import EXIT_DATA_INVALID, DataFormat
from kubetune_trainer.data import (
    IGNORE,
    Example,
    PackedExample,
    collate,
    detect_format,
    load_records,
    pack_examples,
    tokenize_dataset,
    tokenize_record,
    validate_dataset,
)
from kubetune_trainer.errors import DatasetError

from tests.datafixtures import CHAT, COMPLETION, INSTRUCTION, TEXT, tiny_tokenizer, write_jsonl

FMT = DataFormat


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def trained_spans(example: Example, tok) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    spans += [current] if current else []
    return [tok.decode(span) for span in spans]


def untrained_text(example: Example, tok) -> str:
    pairs = zip(example.input_ids, example.labels, strict=True)
    return tok.decode([t for t, label in pairs if label == IGNORE])


# --- loss masks ---------------------------------------------------------------------------------------------


def test_chat_trains_only_assistant_turns_and_their_end_of_turn(tok):
    example = tokenize_record(CHAT, FMT.chat, tok, 512)
    assert trained_spans(example, tok) == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    prompt = untrained_text(example, tok)
    assert "What is the capital of France?" in prompt and "You are a helpful assistant." in prompt
    assert "<|im_start|>assistant\n" in prompt


def weighted(record: dict, *weights) -> dict:
    """The record with OpenAI's "weight" on its assistant turns, in order (None: no weight)."""
    record = copy.deepcopy(record)
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    for message, weight in zip(answers, weights, strict=True):
        if weight is not None:
            message["weight"] = weight
    return record


def test_an_assistant_turn_of_weight_0_is_rendered_but_not_trained(tmp_path, tok):
    """OpenAI's `"weight": 0`: the turn stays in the conversation (the model reads it) and gets no loss; weight 1
    is the default. The data report counts only what is trained."""
    example = tokenize_record(weighted(CHAT, 0, 1), FMT.chat, tok, 512)
    assert trained_spans(example, tok) == ["Rome, of course.<|im_end|>"]
    assert tok.decode(example.input_ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert example.input_ids == tokenize_record(CHAT, FMT.chat, tok, 512).input_ids
    assert trained_spans(tokenize_record(weighted(CHAT, 1, None), FMT.chat, tok, 512), tok) == [
        "Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    reports = [validate_dataset(write_jsonl(tmp_path / f"{name}.jsonl", records), None, fmt=FMT.auto, tokenizer=tok,
                                max_seq_length=512) for name, records in (("plain", [CHAT, CHAT]),
                                                                          ("weighted", [CHAT, weighted(CHAT, 0, 1)]))]
    plain, with_weights = reports
    assert with_weights.tokens == plain.tokens
    assert with_weights.trained_tokens == plain.trained_tokens - len(tok("Paris.<|im_end|>",
                                                                         add_special_tokens=False)["input_ids"])


DOLLY = {"instruction": "Translate to French.", "context": "good morning", "response": "bonjour",
         "category": "open_qa"}


def test_dataset_fields_read_other_column_names_as_the_formats_fields(tmp_path, tok):
    """Dolly's instruction/context/response read as the instruction format with fields {input: context, output:
    response}: the same tokens and labels as the Alpaca record; without the mapping the refusal suggests it."""
    path = write_jsonl(tmp_path / "dolly.jsonl", [DOLLY, DOLLY])
    fields = {"input": "context", "output": "response"}
    mapped = tokenize_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=512, fields=fields)
    alpaca = tokenize_record(INSTRUCTION, FMT.instruction, tok, 512)
    assert [(e.input_ids, e.labels) for e in mapped] == [(alpaca.input_ids, alpaca.labels)] * 2
    report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=512, fields=fields)
    assert (report.format, report.samples) == (FMT.instruction, 2)
    error = assert_bad(path, FMT.auto, tok, 1, "missing field 'output' required by format instruction")
    assert error.hint == ("the record's other keys are category, context, response: if one holds output, map it "
                          "with dataset.fields (e.g. fields: {output: response}), or fix dataset.format")
    error = assert_bad(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]), FMT.auto, tok, 1,
                       "unrecognized record keys (answer, question)")
    assert "dataset.fields" in error.hint


def test_chat_template_that_rerenders_earlier_turns(tok):
    """Like Qwen3's template, which renders the last assistant turn differently from earlier ones."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and loop.last %}<think></think>{% endif %}{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    example = tokenize_record(CHAT, FMT.chat, other, 512)
    assert trained_spans(example, other) == ["Paris.<|im_end|>", "<think></think>Rome, of course.<|im_end|>"]


def test_instruction_trains_output_and_eos(tok):
    example = tokenize_record(INSTRUCTION, FMT.instruction, tok, 512)
    assert trained_spans(example, tok) == ["bonjour</s>"]
    assert untrained_text(example, tok) == (
        "<s>### Instruction:\nTranslate to French.\n\n### Input:\ngood morning\n\n### Response:\n")
    without_input = tokenize_record({"instruction": "Say hi.", "output": "hi"}, FMT.instruction, tok, 512)
    assert untrained_text(without_input, tok) == "<s>### Instruction:\nSay hi.\n\n### Response:\n"


def test_completion_trains_completion_and_eos(tok):
    example = tokenize_record(COMPLETION, FMT.completion, tok, 512)
    assert trained_spans(example, tok) == [" Paris.</s>"]
    assert untrained_text(example, tok) == "<s>The capital of France is"


def test_text_trains_every_token_after_bos(tok):
    example = tokenize_record(TEXT, FMT.text, tok, 512)
    assert example.input_ids[0] == tok.bos_token_id and example.labels[0] == IGNORE
    assert trained_spans(example, tok) == ["Kubernetes schedules pods onto nodes.</s>"]


def test_tokenize_record_truncates(tok):
    example = tokenize_record(TEXT, FMT.text, tok, 5)
    assert len(example.input_ids) == len(example.labels) == 5


# --- formats and loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, fmt", [(CHAT, FMT.chat), (INSTRUCTION, FMT.instruction),
                                         ({"instruction": "x", "output": "y"}, FMT.instruction),
                                         (COMPLETION, FMT.completion), (TEXT, FMT.text)])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_unknown_keys_lists_expected():
    with pytest.raises(DatasetError) as e:
        detect_format({"question": "?", "answer": "!"})
    assert e.value.exit_code == EXIT_DATA_INVALID
    assert "answer, question" in e.value.problem and "prompt + completion" in e.value.problem


def test_validate_reports_auto_detected_format(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT, CHAT])
    report = validate_dataset(path, "s3://b/train.jsonl", fmt=FMT.auto, tokenizer=tok, max_seq_length=512)
    example = tokenize_record(CHAT, FMT.chat, tok, 512)
    assert (report.file, report.format, report.samples) == ("s3://b/train.jsonl", FMT.chat, 3)
    assert report.truncated == 0
    assert report.tokens == 3 * len(example.input_ids) and report.max_length == len(example.input_ids)
    assert report.trained_tokens == 3 * sum(label != IGNORE for label in example.labels)
    assert report.warnings == []


def test_truncated_records_are_counted_and_named(tmp_path, tok):
    long = {"prompt": "Hi", "completion": " Paris is the capital of France." * 20}
    path = write_jsonl(tmp_path / "d.jsonl", [COMPLETION, long, COMPLETION, long])
    report = validate_dataset(path, None, fmt=FMT.completion, tokenizer=tok, max_seq_length=32)
    assert report.truncated == 2 and report.max_length > 32
    assert report.tokens <= 4 * 32
    assert len(report.warnings) == 1 and "line 2, line 4" in report.warnings[0]
    examples = tokenize_dataset(path, None, fmt=FMT.completion, tokenizer=tok, max_seq_length=32)
    assert [len(e.input_ids) for e in examples][1::2] == [32, 32]


def test_json_array_directory_and_content_sniffing(tmp_path, tok):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "b.json").write_text(json.dumps([TEXT, TEXT]))  # a JSON array
    write_jsonl(folder / "a.json", [TEXT])  # JSONL despite the suffix
    (folder / "_SUCCESS").write_text("")
    (folder / ".hidden.jsonl").write_text("not json")
    records = list(load_records(folder, "s3://bucket/data/"))
    assert [(r.file, r.line) for r in records] == [
        ("s3://bucket/data/a.json", 1), ("s3://bucket/data/b.json", 1), ("s3://bucket/data/b.json", 2)]
    report = validate_dataset(folder, "s3://bucket/data/", fmt=FMT.auto, tokenizer=tok, max_seq_length=64)
    assert report.samples == 3


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(TEXT) + "\n\n" + json.dumps(TEXT) + "\n")
    assert [r.line for r in load_records(path)] == [1, 3]


def test_parquet_records(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), path)
    assert [r.value for r in load_records(path)] == [CHAT, CHAT]
    report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=512)
    assert (report.format, report.samples) == (FMT.chat, 2)


# --- bad data: the first problem, with file and line --------------------------------------------------------


def chat(*turns, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    return {"messages": messages + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


def message_list(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = chat("Hi", "Hello!")
BAD_RECORDS = {
    "unknown role": ([GOOD, message_list(("user", "Hi"), ("bot", "Hello"))], FMT.auto, 2, "role 'bot'"),
    "no assistant turn": ([GOOD, GOOD, message_list(("user", "Hi"))], FMT.auto, 3, "no assistant message"),
    "empty content": ([chat("Hi", "   ")], FMT.auto, 1, "empty content"),
    "content not a string": ([GOOD, chat("Hi", ["a", "list"])], FMT.chat, 2, "content is an array"),
    "system not first": ([message_list(("user", "Hi"), ("system", "S"), ("assistant", "A"))], FMT.chat, 1,
                         "only the first message may be system"),
    "no alternation": ([message_list(("user", "Hi"), ("user", "Hey"), ("assistant", "A"))], FMT.chat, 1,
                       "both user turns"),
    "assistant first": ([message_list(("assistant", "Hi"), ("user", "A"))], FMT.chat, 1,
                        "before any user turn"),
    "empty messages": ([{"messages": []}], FMT.auto, 1, "non-empty array"),
    "weight not 0 or 1": ([GOOD, weighted(chat("Hi", "Hello", "Bye", "Ciao"), 1, 0.5)], FMT.auto, 2,
                          "message 4 (assistant) has weight 0.5; a weight is 0 (do not train this turn) or 1"),
    "weight as a string": ([weighted(GOOD, "0")], FMT.chat, 1, "has weight '0'"),
    "weight as a boolean": ([weighted(GOOD, False)], FMT.chat, 1, "has weight False"),
    "weight on a user turn": ([{"messages": [{"role": "user", "content": "Hi", "weight": 1},
                                             {"role": "assistant", "content": "A"}]}], FMT.chat, 1,
                              "message 1 (user) has a weight; only assistant turns take one"),
    "every answer weight 0": ([GOOD, GOOD, weighted(chat("Hi", "Hello", "Bye", "Ciao"), 0, 0)], FMT.auto, 3,
                              "every assistant message has weight 0: nothing to train on"),
    "mixed formats": ([GOOD, GOOD, COMPLETION], FMT.auto, 3, "record is completion but the first record"),
    "declared format missing field": ([TEXT, COMPLETION], FMT.text, 2,
                                      "missing field 'text' required by format text; the record looks like "
                                      "completion"),
    "unknown keys": ([TEXT, {"question": "q"}], FMT.auto, 2, "unrecognized record keys (question)"),
    "empty instruction output": ([INSTRUCTION, {"instruction": "Do it", "output": ""}], FMT.auto, 2,
                                 "field 'output' is empty"),
    "input not a string": ([{"instruction": "Do it", "input": 3, "output": "ok"}], FMT.auto, 1,
                           "field 'input' is a number"),
    "whitespace text": ([TEXT, TEXT, TEXT, {"text": "\n \t"}], FMT.text, 4, "field 'text' is empty"),
    "null completion": ([{"prompt": "p", "completion": None}], FMT.completion, 1, "'completion' is null"),
    "not an object": ([TEXT, ["a", "list"]], FMT.auto, 2, "record is a JSON array, expected an object"),
    "trained part truncated": ([COMPLETION, {"prompt": "word " * 200, "completion": "x"}], FMT.auto, 2,
                               "no trained tokens left after truncation to maxSeqLength 64"),
}


@pytest.mark.parametrize("records, fmt, line, problem", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_records(tmp_path, tok, records, fmt, line, problem):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    assert_bad(path, fmt, tok, line, problem)


def assert_bad(path, fmt, tok, line, problem, name="s3://bucket/data.jsonl", min_samples=1, file=None):
    for check in (validate_dataset, tokenize_dataset):
        kwargs = {"min_samples": min_samples} if check is validate_dataset else {}
        with pytest.raises(DatasetError) as e:
            check(path, name, fmt=fmt, tokenizer=tok, max_seq_length=64, **kwargs)
        error = e.value
        assert (error.exit_code, error.file, error.line) == (EXIT_DATA_INVALID, file or name, line)
        assert problem in error.problem and error.hint
        assert str(error).startswith(f"{file or name}:{line}: " if line else f"{file or name}: ")
        if min_samples > 1:
            break  # tokenize_dataset has no minimum
    return error


def test_bad_json_on_line_3(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(TEXT) + "\n" + json.dumps(TEXT) + '\n{"text": "unterminated\n')
    assert_bad(path, FMT.auto, tok, 3, "invalid JSON")


def test_bad_json_in_a_json_array(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text('[\n{"text": "a"},\n{"text": "b",,}\n]')
    assert_bad(path, FMT.auto, tok, 3, "invalid JSON")


def test_not_utf8(tmp_path, tok):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(TEXT).encode() + b'\n{"text": "caf\xe9"}\n')
    assert_bad(path, FMT.auto, tok, 2, "not valid UTF-8")


def test_json_array_element_not_an_object(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([TEXT, TEXT, "just a string"]))
    assert_bad(path, FMT.auto, tok, 3, "record is a JSON string, expected an object")


def test_too_few_samples(tmp_path, tok):
    path = write_jsonl(tmp_path / "data.jsonl", [TEXT, TEXT])
    assert_bad(path, FMT.auto, tok, 0, "the train split has 2 valid records, fewer than the minimum of 5",
               min_samples=5)


def test_bad_parquet_row(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([COMPLETION, COMPLETION, {"prompt": "p", "completion": ""}]), path)
    assert_bad(path, FMT.auto, tok, 3, "field 'completion' is empty")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    assert_bad(tmp_path / "broken.parquet", FMT.auto, tok, 0, "not a readable Parquet file")


def test_error_in_a_directory_names_the_file(tmp_path, tok):
    write_jsonl(tmp_path / "part-0.jsonl", [TEXT])
    write_jsonl(tmp_path / "part-1.jsonl", [TEXT, {"text": ""}])
    assert_bad(tmp_path, FMT.auto, tok, 2, "field 'text' is empty", name="s3://bucket/data/",
               file="s3://bucket/data/part-1.jsonl")


def test_chat_needs_a_chat_template(tmp_path):
    from kubetune_dev.tokenizer import train_tokenizer
    from kubetune_trainer.errors import ConfigError

    plain = train_tokenizer(["hello world"], vocab_size=300)
    plain.chat_template = None
    with pytest.raises(ConfigError):
        tokenize_record(GOOD, FMT.chat, plain, 64)


# --- packing and collation ----------------------------------------------------------------------------------


def fake_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        size = rng.randint(1, 50)
        ids = [1000 * i + j for j in range(size)]
        examples.append(Example(ids, [IGNORE] + [t if j % 3 else IGNORE for j, t in enumerate(ids)][1:]))
    return examples


def test_pack_examples_keeps_every_sample_whole(tok):
    examples = fake_examples(200)
    packed = pack_examples(examples, 64, seed=1)
    assert all(isinstance(p, PackedExample) and len(p.input_ids) <= 64 for p in packed)
    assert len(packed) <= -(-sum(len(e.input_ids) for e in examples) // 64) * 1.1  # close to optimal
    seen = []
    for p in packed:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids) == sum(p.lengths)
        start = 0
        for size in p.lengths:
            piece = slice(start, start + size)
            assert p.position_ids[piece] == list(range(size))
            original = examples[p.input_ids[start] // 1000]
            assert p.input_ids[piece] == original.input_ids and p.labels[piece] == original.labels
            seen.append(p.input_ids[start] // 1000)
            start += size
    assert sorted(seen) == list(range(200))
    assert pack_examples(examples, 64, seed=1) == packed  # deterministic


def test_pack_rejects_too_long_examples():
    with pytest.raises(ValueError):
        pack_examples([Example([1] * 10, [1] * 10)], 8)


def test_collate_unpacked_and_packed():
    a, b = Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [IGNORE])
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch
    packed = pack_examples([a, b, Example([9, 9], [IGNORE, 9])], 4)
    batch = collate(packed, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 9, IGNORE, IGNORE]]
    with pytest.raises(ValueError):
        collate([a, packed[0]], 0)


def test_packed_samples_do_not_attend_to_each_other(tok):
    """transformers (5.x) builds a block-diagonal causal mask from restarting position_ids when there is no
    attention_mask and no KV cache (use_cache=False, as forward_loss passes), so a sample's logits inside a
    packed row equal its logits alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    records = {FMT.chat: CHAT, FMT.instruction: INSTRUCTION, FMT.completion: COMPLETION, FMT.text: TEXT}
    examples = [tokenize_record(r, f, tok, 256) for f, r in records.items()]
    packed = pack_examples(examples, 128)
    assert len(packed) == 2  # several samples share a row; one row is padded
    batch = collate(packed, tok.pad_token_id)
    with torch.no_grad():
        logits = model(**batch_inputs(batch), use_cache=False).logits
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits  # samples see each other
    differs = False
    for row, p in enumerate(packed):
        start = 0
        for size in p.lengths:
            ids = torch.tensor([p.input_ids[start : start + size]])
            with torch.no_grad():
                alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, start : start + size], alone, atol=1e-4, rtol=1e-4)
            differs |= start > 0 and not torch.allclose(crossed[row, start : start + size], alone, atol=1e-4)
            start += size
    assert differs  # the check above is meaningful


def batch_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# --- the tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_and_renders_chat(tmp_path, tok):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "The quick brown fox, café ünïcode 🚀!"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert loaded.pad_token_id not in (loaded.bos_token_id, loaded.eos_token_id)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n")
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded(rendered, add_special_tokens=False)["input_ids"]
    assert tokenize_record(CHAT, FMT.chat, loaded, 512) == tokenize_record(CHAT, FMT.chat, tok, 512)
