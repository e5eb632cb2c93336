"""The ShareGPT format: detected from "conversations", checked and tokenized exactly like the chat record it maps to."""

from __future__ import annotations

import pytest
from kubetune_api import EXIT_DATA_INVALID, DataFormat
from kubetune_trainer.data import detect_format, load_records, tokenize_dataset, tokenize_record, validate_dataset
from kubetune_trainer.errors import DatasetError

from tests.datafixtures import CHAT, tiny_tokenizer, write_jsonl

FMT = DataFormat
SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT = {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]} for m in CHAT["messages"]]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def sharegpt(*turns: tuple[str, object]) -> dict:
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns]}


def test_detected_from_conversations(tmp_path, tok):
    assert detect_format(SHAREGPT) == FMT.sharegpt
    assert detect_format({**SHAREGPT, **CHAT}) == FMT.chat  # messages first, as documented
    path = write_jsonl(tmp_path / "train.jsonl", [SHAREGPT, SHAREGPT])
    report = validate_dataset(path, "s3://b/train.jsonl", fmt=FMT.auto, tokenizer=tok, max_seq_length=512)
    assert (report.format, report.samples) == (FMT.sharegpt, 2)


def test_unknown_keys_name_sharegpt():
    with pytest.raises(DatasetError) as e:
        detect_format({"dialogue": []})
    assert "conversations (sharegpt)" in e.value.problem


@pytest.mark.parametrize("record", [
    SHAREGPT,
    {"conversations": [{"from": m["role"], "value": m["content"]} for m in CHAT["messages"]]},  # user/assistant
    {"conversations": [{**turn, "weight": 1} for turn in SHAREGPT["conversations"]]},  # extra keys are ignored
], ids=["human-gpt", "user-assistant", "extra-keys"])
def test_same_tokens_and_labels_as_the_chat_record(tok, record):
    expected = tokenize_record(CHAT, FMT.chat, tok, 512)
    got = tokenize_record(record, FMT.sharegpt, tok, 512)
    assert (got.input_ids, got.labels) == (expected.input_ids, expected.labels)
    short = tokenize_record(record, FMT.sharegpt, tok, 20)
    assert (short.input_ids, short.labels) == (expected.input_ids[:20], expected.labels[:20])


GOOD = sharegpt(("human", "Hi"), ("gpt", "Hello!"))
BAD = {
    "unknown from": ([GOOD, sharegpt(("human", "Hi"), ("bot", "Hello"))], 2,
                     "turn 2 has from 'bot'; from must be one of system, human, gpt, user, assistant"),
    "missing from": ([{"conversations": [{"value": "Hi"}]}], 1, "turn 1 has from None"),
    "from not a string": ([sharegpt((["human"], "Hi"), ("gpt", "A"))], 1, "turn 1 has from ['human']"),
    "turn not an object": ([{"conversations": ["Hi"]}], 1, "turn 1 is a string, expected an object"),
    "empty conversations": ([{"conversations": []}], 1, "'conversations' must be a non-empty array"),
    "no gpt turn": ([GOOD, sharegpt(("human", "Hi"))], 2, "no gpt turn: nothing to train on"),
    "gpt first": ([sharegpt(("system", "S"), ("gpt", "Hi"), ("human", "A"))], 1,
                  "turn 2 (gpt) comes before any human turn"),
    "no alternation": ([sharegpt(("human", "Hi"), ("user", "Hey"), ("gpt", "A"))], 1,
                       "turns 1 and 2 are both human turns; human and gpt turns alternate"),
    "system later": ([sharegpt(("human", "Hi"), ("system", "S"), ("gpt", "A"))], 1,
                     "turn 2 is a system turn; only the first turn may be system"),
    "empty value": ([sharegpt(("human", "Hi"), ("gpt", "  "))], 1, "turn 2 (gpt) has empty value"),
    "value not a string": ([sharegpt(("human", "Hi"), ("gpt", None))], 1, "turn 2 value is null, expected a string"),
    "declared sharegpt, chat record": ([CHAT], 1, "missing field 'conversations' required by format sharegpt; the "
                                       "record looks like chat"),
}


@pytest.mark.parametrize("records, line, problem", BAD.values(), ids=BAD.keys())
def test_bad_records_are_refused_with_file_line_and_problem(tmp_path, tok, records, line, problem):
    fmt = FMT.sharegpt if "required by format" in problem else FMT.auto
    path = write_jsonl(tmp_path / "data.jsonl", records)
    for check in (validate_dataset, tokenize_dataset):
        with pytest.raises(DatasetError) as e:
            check(path, "s3://b/data.jsonl", fmt=fmt, tokenizer=tok, max_seq_length=64)
        assert (e.value.exit_code, e.value.file, e.value.line) == (EXIT_DATA_INVALID, "s3://b/data.jsonl", line)
        assert problem in e.value.problem and e.value.hint
        assert str(e.value).startswith(f"s3://b/data.jsonl:{line}: ")


def test_jsonl_and_parquet_round_trip(tmp_path, tok):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    records = [SHAREGPT, sharegpt(("human", "Hi"), ("gpt", "Hello!")), SHAREGPT]
    chats = [{"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                            "content": t["value"]} for t in r["conversations"]]} for r in records]
    expected = [(e.input_ids, e.labels) for e in (tokenize_record(c, FMT.chat, tok, 512) for c in chats)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    for path in (jsonl, parquet):
        assert [r.value for r in load_records(path)] == records
        report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=512)
        assert (report.format, report.samples) == (FMT.sharegpt, 3)
        examples = tokenize_dataset(path, None, fmt=FMT.sharegpt, tokenizer=tok, max_seq_length=512)
        assert [(e.input_ids, e.labels) for e in examples] == expected
