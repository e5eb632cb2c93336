"""Data at scale: one streaming pass (validate + tokenize, on a process pool) into a memory-mapped cache that the
trainer reuses; cached and uncached paths give the same sequences; damaged or foreign caches are rebuilt."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from kubetune_api import DataFormat
from kubetune_trainer.data import IGNORE, Example, pack_examples, tokenize_dataset, validate_dataset
from kubetune_trainer.data import records as records_module
from kubetune_trainer.data.cache import META, Cache, SplitWriter, TokenizedSplit
from kubetune_trainer.data.report import count_parameters, data_report
from kubetune_trainer.data.tokenize import record_segments
from kubetune_trainer.errors import DatasetError
from kubetune_trainer.fetch import Fetched, tokenizer_sha256, tree_sha256
from kubetune_trainer.prepare import prepare
from kubetune_trainer.tasks import task_for

from tests.datafixtures import tiny_tokenizer, write_jsonl

FMT = DataFormat
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def records_of(fmt: DataFormat, n: int, seed: int = 0) -> list[dict]:
    """n records of a format, some truncated at 128 tokens (64 with packing), multi-turn chats among them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = i % 17 == 0
        answer = words(rng, 30, 60) if long else words(rng, 1, 8)
        if fmt == FMT.chat:
            turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
            for _ in range(1 + i % 2):
                turns += [{"role": "user", "content": words(rng, 1, 6) + "?"},
                          {"role": "assistant", "content": answer}]
            out.append({"messages": turns})
        elif fmt == FMT.sharegpt:
            out.append({"conversations": [{"from": "human", "value": words(rng, 1, 6)},
                                          {"from": "gpt", "value": answer}]})
        elif fmt == FMT.instruction:
            out.append({"instruction": words(rng, 1, 5), "input": words(rng, 0, 3), "output": answer})
        elif fmt == FMT.completion:
            out.append({"prompt": words(rng, 1, 5), "completion": answer})
        else:
            out.append({"text": answer})
    return out


def reference(values: list[dict], fmt: DataFormat, tok) -> list[Example]:
    """Tokenized the plain way: each segment by tokenizer(text), one record at a time (not truncated)."""
    out = []
    for value in values:
        ids, labels = [], []
        for text, trained in record_segments(value, fmt, tok):
            if text:
                piece = tok(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
        if fmt not in (FMT.chat, FMT.sharegpt):
            ids, labels = [tok.bos_token_id] + ids + [tok.eos_token_id], [IGNORE] + labels + [tok.eos_token_id]
        labels[0] = IGNORE
        out.append(Example(ids, labels))
    return out


def digest(sequences) -> str:
    """A hash of every sequence's ids, labels and (packed) positions, in order."""
    h = hashlib.sha256()
    for s in sequences:
        for field in (s.input_ids, s.labels, getattr(s, "position_ids", [])):
            h.update(np.asarray(field, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


@pytest.mark.parametrize("fmt", [FMT.chat, FMT.sharegpt, FMT.instruction, FMT.completion, FMT.text])
def test_the_pass_writes_what_per_record_tokenization_gives_on_one_or_two_workers(tmp_path, tok, fmt):
    values = records_of(fmt, 1100)  # three chunks of the pass
    path = write_jsonl(tmp_path / "train.jsonl", values)
    full = reference(values, fmt, tok)
    expected = [Example(e.input_ids[:128], e.labels[:128]) for e in full]
    for workers in (1, 2):
        writer = SplitWriter(tmp_path / f"cache-{workers}")
        report = validate_dataset(path, None, fmt=FMT.auto, tokenizer=tok, max_seq_length=128, sink=writer.add,
                                  workers=workers)
        writer.close(128, packing=False, seed=None)
        examples = TokenizedSplit(tmp_path / f"cache-{workers}")
        assert report.format == fmt and report.samples == len(examples) == len(values)
        assert digest(examples) == digest(expected), workers
        assert report.tokens == sum(len(e) for e in expected)
        assert report.trained_tokens == sum(e.trained_tokens for e in expected)
        assert report.truncated == sum(len(e) > 128 for e in full) > 0
        assert report.max_length == max(len(e) for e in full)
    one, two = (hashlib.sha256((tmp_path / f"cache-{w}" / "ids.bin").read_bytes()).hexdigest() for w in (1, 2))
    assert one == two


def test_the_first_bad_record_is_named_whatever_the_number_of_workers(tmp_path, tok):
    values = records_of(FMT.chat, 1400)
    values[1203] = {"messages": [{"role": "user", "content": "no answer"}]}
    values[1350] = {"text": "another format"}
    path = write_jsonl(tmp_path / "train.jsonl", values)
    for workers in (1, 2):
        with pytest.raises(DatasetError) as e:
            validate_dataset(path, "s3://data/train.jsonl", fmt=FMT.auto, tokenizer=tok, max_seq_length=64,
                             workers=workers)
        assert (e.value.file, e.value.line) == ("s3://data/train.jsonl", 1204)
        assert "assistant" in e.value.problem


def test_a_json_array_is_read_record_by_record(tmp_path, monkeypatch, tok):
    monkeypatch.setattr(records_module, "JSON_CHUNK", 50)  # records span many reads
    values = records_of(FMT.chat, 60)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(values, indent=1, ensure_ascii=False))
    assert [r.value for r in records_module.load_records(path)] == values
    path.write_text(json.dumps(values[:3], indent=1)[:-3] + ",, ]")
    with pytest.raises(DatasetError) as e:
        list(records_module.load_records(path))
    assert e.value.line > 10 and "invalid JSON" in e.value.problem


# --- the cache, through the pipeline's data stage ------------------------------------------------------------


@pytest.fixture
def stage(tmp_path, make_config, storage, tiny_base):
    """prepare() for chat splits, with a fresh work dir each call and one cache prefix in S3."""
    data = {s: write_jsonl(tmp_path / f"{s}.jsonl", records_of(FMT.chat, n, seed=i))
            for i, (s, n) in enumerate({"train": 300, "validation": 40, "test": 40}.items())}
    cache_uri = f"s3://adapters/{tmp_path.name}-cache/"
    calls = []

    def run(work_dir: str | None = None, examples: bool = True, **hyperparameters):
        """work_dir: an earlier call's (the same node), else a fresh one. examples=False: as kubetune validate."""
        config = make_config("cache", dataset={"cacheUri": cache_uri},
                             hyperparameters={"maxSeqLength": 64, "packing": True, **hyperparameters},
                             workDir=work_dir or str(tmp_path / f"work-{len(calls)}"))
        task = task_for(config, tiny_base)
        task.load_processor()
        fetched = Fetched(Path(tiny_base), dict(data), {s: f"s3://data/{s}.jsonl" for s in data})
        inputs = {"datasets": {s: tree_sha256(p) for s, p in data.items()}, "tokenizer": tokenizer_sha256(tiny_base)}
        events = []
        prepared = prepare(config, task, fetched, storage, inputs, report=events.append, examples=examples)
        calls.append(config)
        return prepared, events, config

    run.data = data
    return run


def test_cached_and_uncached_sequences_are_identical(stage, tiny_base):
    built, events, config = stage()
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["built"]
    tok = task_for(config, tiny_base).load_processor()
    uncached = {s: pack_examples(tokenize_dataset(p, None, fmt=FMT.chat, tokenizer=tok, max_seq_length=64),
                                 64, seed=config.hyperparameters.seed) for s, p in stage.data.items()}
    assert {s: digest(v) for s, v in built.splits.items()} == {s: digest(v) for s, v in uncached.items()}
    assert built.reports["train"].sequences == len(uncached["train"]) < built.reports["train"].samples

    downloaded, events, _ = stage()  # a fresh node: the cache comes from object storage
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["downloaded"]
    assert downloaded.cache == {**built.cache, "reused": True}
    assert {s: digest(v) for s, v in downloaded.splits.items()} == {s: digest(v) for s, v in uncached.items()}
    assert downloaded.reports == built.reports

    validated, events, config = stage(examples=False)  # a validation retry: the cache's meta.json says it all
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["found"]
    assert validated.reports == built.reports and validated.splits == {}
    assert not (Path(config.work_dir) / "data-cache").exists()  # nothing downloaded

    other, events, _ = stage(seed=7)  # another packing order is another cache
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["built"]
    assert other.cache["key"] != built.cache["key"]


def test_a_truncated_or_foreign_cache_is_detected_and_rebuilt(stage, storage):
    built, _, config = stage()
    uri = built.cache["uri"]
    local = Path(config.work_dir) / "data-cache" / built.cache["key"]
    ids = local / "train" / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-8])
    # The same node again: its truncated copy is noticed, the one in object storage is fetched instead.
    prepared, events, _ = stage(work_dir=config.work_dir)
    assert events[0]["event"] == "data_cache_rebuilt" and "truncated" in events[0]["problem"]
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["downloaded"]
    assert prepared.reports == built.reports

    meta = storage.get_json(uri + META)
    storage.put_json(uri + META, {**meta, "key": "0" * 32})  # another cache's files under this key
    prepared, events, _ = stage()
    assert events[0]["event"] == "data_cache_rebuilt" and "foreign" in events[0]["problem"]
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["built"]
    assert storage.get_json(uri + META)["key"] == built.cache["key"]  # uploaded again, whole
    assert prepared.reports == built.reports


def test_a_shared_cache_whose_arrays_were_changed_is_not_trusted(stage, storage, tmp_path):
    """Attack (issue 27.7): someone who can write dataset.cacheUri replaces a token array with one of the same size
    (other tokens: the model would train on what they chose), leaving meta.json as it was. Answer: every array
    of a cache from the cache URI is checked against the sha256 its meta.json records before it is trusted; this
    one is rebuilt from the data (data_cache_rebuilt names the file) and uploaded again whole."""
    built, _, config = stage()
    uri = built.cache["uri"]
    meta = storage.get_json(uri + META)
    assert meta["version"] == 3 and all(len(f["sha256"]) == 64 for entry in meta["splits"].values()
                                        for f in entry["files"].values())
    original = storage.download(uri + "train/ids.bin", tmp_path / "original").read_bytes()
    forged = tmp_path / "forged" / "ids.bin"
    forged.parent.mkdir()
    forged.write_bytes(np.full(len(original) // 4, 7, dtype=np.int32).tobytes())  # same size, other tokens
    storage.upload_file(forged, uri + "train/ids.bin")

    prepared, events, _ = stage()  # a fresh node: the cache comes from the cache URI
    assert events[0]["event"] == "data_cache_rebuilt", events
    assert "train/ids.bin does not match the sha256 in its meta.json" in events[0]["problem"]
    assert [e["cache"] for e in events if e["event"] == "data_cache"] == ["built"]
    assert storage.download(uri + "train/ids.bin", tmp_path / "again").read_bytes() == original
    assert prepared.reports == built.reports


# --- what the data costs ------------------------------------------------------------------------------------


def test_the_data_report_counts_steps_and_estimates_gpu_hours(stage, tiny_base):
    from transformers import AutoModel

    prepared, _, config = stage()
    config = config.model_copy(update={"hardware": config.hardware.model_copy(
        update={"processes": 8, "gpus": 8, "gpu_tflops": 100.0})})
    task = task_for(config, tiny_base)
    doc = data_report(config, task, prepared.reports, tiny_base, prepared.cache)
    train = prepared.reports["train"]
    assert doc["sequences"] == train.sequences and doc["plannedSteps"] == config.hyperparameters.max_steps
    assert doc["packingEfficiency"] == pytest.approx(train.tokens / (train.sequences * 64), abs=1e-4)
    parameters = sum(p.numel() for p in AutoModel.from_pretrained(tiny_base).parameters())
    assert count_parameters(tiny_base, config.task) == parameters == doc["estimate"]["parameters"]
    step_sequences = config.hyperparameters.batch_size * config.hyperparameters.gradient_accumulation_steps * 8
    tokens = doc["plannedSteps"] * step_sequences * train.tokens / train.sequences
    assert doc["estimate"]["flops"] == pytest.approx(4 * parameters * tokens, rel=1e-3)  # LoRA: 4 N T
    assert doc["estimate"]["gpuHours"] == pytest.approx(4 * parameters * tokens / (8 * 100e12) * 8 / 3600, rel=1e-2)
    assert doc["summary"].startswith(f"train {train.samples:,} samples") and "GPU-hours on 8 GPUs" in doc["summary"]
    assert len(json.dumps({"valid": True, **doc})) < 4000  # fits a termination message
    assert "estimate" not in data_report(config.model_copy(update={"hardware": config.hardware.model_copy(
        update={"gpus": 0})}), task, prepared.reports, tiny_base)
    assert Cache(Path(config.work_dir) / "data-cache" / prepared.cache["key"]).reports() == prepared.reports


# --- rendering chat templates fast --------------------------------------------------------------------------

LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if loop.index0 == 0 and message['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "llama3-like"])
def test_rendering_equals_apply_chat_template(tok, template):
    from kubetune_trainer.data.formats import RecordError
    from kubetune_trainer.data.tokenize import render

    tok = copy_of(tok, None if template == "chatml" else LLAMA3_LIKE)
    for value in records_of(FMT.chat, 50):
        for prompt in (False, True):
            assert render(tok, value["messages"], prompt) == tok.apply_chat_template(
                value["messages"], tokenize=False, add_generation_prompt=prompt)
    odd = [{"role": "user", "content": "hi", "name": "ann"}, {"role": "assistant", "content": "hello"}]
    assert render(tok, odd) == tok.apply_chat_template(odd, tokenize=False)  # other keys: transformers renders
    if template != "chatml":
        with pytest.raises(RecordError, match="user first"):
            render(tok, [{"role": "assistant", "content": "hi"}])


def copy_of(tok, chat_template: str | None):
    import copy

    other = copy.deepcopy(tok)
    if chat_template:
        other.chat_template = chat_template
    return other
