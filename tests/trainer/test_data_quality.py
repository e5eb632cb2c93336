"""The validation's data-quality checks, end to end through `kubetune validate` on files of our own that plant each
problem: duplicates in train, evaluation records that train repeats (exactly and nearly), personal data and
secrets; what `dataset.quality` does about each (drop, warn, fail, off), and where it shows (the table, --json,
the termination message, the cache key)."""

from __future__ import annotations

import json
import random

import pytest
from kubetune_trainer.cli import app
from typer.testing import CliRunner

from tests.datafixtures import tiny_tokenizer, write_jsonl

WORDS = ("account billing refund password invoice order shipping delivery update plan upgrade cancel receipt "
         "address phone email login reset card payment subscription support ticket monthly yearly discount "
         "coupon return exchange warranty repair device screen battery charger cable setting profile").split()


def conversation(rng: random.Random, words: int = 30) -> dict:
    question = " ".join(rng.choice(WORDS) for _ in range(words))
    answer = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"messages": [{"role": "user", "content": question.capitalize() + "?"},
                         {"role": "assistant", "content": answer.capitalize() + "."}]}


def near_copy(record: dict, rng: random.Random) -> dict:
    """The same conversation with one word of the answer changed and different punctuation and case."""
    user, assistant = (m["content"] for m in record["messages"])
    words = assistant.rstrip(".").split()
    words[len(words) // 2] = "changed"
    return {"messages": [{"role": "user", "content": user.upper()},
                         {"role": "assistant", "content": " ".join(words) + "!"}]}


@pytest.fixture
def planted(tmp_path):
    """train: 200 distinct conversations + 20 exact repeats (one with extra spaces and capitals) + 3 with
    personal data; test: 40 of its own, 10 exact copies of train records and 5 near copies."""
    rng = random.Random(7)
    train = [conversation(rng) for _ in range(200)]
    repeats = [json.loads(json.dumps(train[i])) for i in range(0, 40, 2)]
    repeats[0]["messages"][0]["content"] = "  " + repeats[0]["messages"][0]["content"].upper() + "  "
    personal = [conversation(rng) for _ in range(3)]
    personal[0]["messages"][1]["content"] += " Write to jane.doe@example.com."
    personal[1]["messages"][1]["content"] += " My key is AKIAIOSFODNN7EXAMPLE."
    personal[2]["messages"][1]["content"] += " Call +1 650-253-0000 today."
    test = [conversation(rng) for _ in range(40)] + [train[i] for i in range(100, 110)] + \
        [near_copy(train[i], rng) for i in range(150, 155)]
    write_jsonl(tmp_path / "train.jsonl", train + repeats + personal)
    write_jsonl(tmp_path / "test.jsonl", test)
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path


def validate(tmp_path, quality: dict | None = None, *extra: str):
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "quality"},
           "spec": {"baseModel": {"uri": str(tmp_path / "model")},
                    "dataset": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"),
                                "quality": quality or {}},
                    "hyperparameters": {"maxSeqLength": 256},
                    "checkpoint": {"uri": str(tmp_path / "checkpoints") + "/"},
                    "output": {"uri": str(tmp_path / "out") + "/"}}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    log = tmp_path / "termination-log"
    done = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "job.yaml"), *extra],
                              env={"COLUMNS": "160", "KUBETUNE_TERMINATION_LOG": str(log)})
    return done, (log.read_text() if log.exists() else "")


def test_the_defaults_drop_repeats_and_train_copies_of_test_records_and_report_the_rest(planted):
    done, log = validate(planted, None, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    q = report["quality"]
    assert q["duplicates"]["train"]["count"] == 20
    assert q["duplicates"]["train"]["lines"] == list(range(201, 221))
    leak = q["leakage"]["test"]
    assert (leak["exact"], leak["near"]) == (10, 5), leak
    assert leak["lines"] == list(range(41, 56)) and all(isinstance(line, int) for line in leak["lines"])
    assert {k: q["pii"]["train"][k] for k in ("email", "phone", "card", "secret")} == \
        {"email": 1, "phone": 1, "card": 0, "secret": 1}
    assert q["pii"]["train"]["lines"] == [221, 222, 223]
    actions = {(a["check"], a["split"]): a for a in q["actions"]}
    assert actions["duplicates", "train"]["action"] == "drop"
    assert actions["leakage", "train"]["action"] == "drop" and actions["leakage", "train"]["count"] >= 15
    assert actions["personalData", "train"]["action"] == "warn"
    # 223 train records, less 20 repeats and the 15 that test copies (the repeats of them counted once)
    dropped = set(q["duplicates"]["train"]["lines"]) | set(actions["leakage", "train"]["lines"])
    assert report["splits"]["train"]["samples"] == 223 - len(dropped)
    assert q["dropped"]["train"]["count"] == len(dropped)
    # The termination message: counts, never lines, never the values found
    brief = json.loads(log)["quality"]
    assert brief["duplicates"] == {"train": 20, "test": 0} and brief["leakage"] == {"test": {"exact": 10, "near": 5}}
    assert brief["dropped"] == {"train": len(dropped)} and brief["findings"] >= 3
    for secret in ("jane.doe", "AKIAIOSFODNN7EXAMPLE", "650-253-0000"):
        assert secret not in done.output and secret not in log


def test_the_table_says_what_was_found_and_done(planted):
    done, _ = validate(planted)
    assert done.exit_code == 0, done.output
    rows = {tuple(c.strip() for c in line.split("│")[1:3]): [c.strip() for c in line.split("│")[3:-1]]
            for line in done.output.splitlines() if line.startswith("│")}
    assert rows["duplicates", "train"] == ["20", "drop"], done.output
    assert rows["in train (leakage)", "test"] == ["10 exact, 5 near", "drop"], done.output
    assert rows["personal data", "train"] == ["1 email, 1 phone, 1 secret", "warn"], done.output
    assert "data quality: train:" in done.output


def test_warn_trains_on_everything_and_off_does_not_look(planted):
    done, _ = validate(planted, {"duplicates": "warn", "leakage": "warn"}, "--json")
    report = json.loads(done.stdout)
    assert report["splits"]["train"]["samples"] == 223
    assert report["quality"]["duplicates"]["train"]["count"] == 20 and "dropped" not in report["quality"] or \
        not report["quality"]["dropped"]
    done, _ = validate(planted, {"duplicates": "off", "leakage": "off", "personalData": "off"}, "--json")
    q = json.loads(done.stdout).get("quality") or {}
    assert not q.get("duplicates") and not q.get("leakage") and not q.get("pii")


@pytest.mark.parametrize(("check", "field", "first"), [("duplicates", "duplicates", 201),
                                                      ("leakage", "leakage", 41),
                                                      ("personalData", "personal data", 221)])
def test_fail_refuses_the_data_naming_the_lines_and_the_field(planted, check, field, first):
    done, log = validate(planted, {check: "fail"})
    assert done.exit_code == 65, done.output
    assert f"(lines {first}, " in log and f"dataset.quality.{check}" in log, log
    assert "jane.doe" not in log and "AKIA" not in log


def test_the_policy_is_part_of_the_cache_key(planted):
    from kubetune_api import TrainerConfig
    from kubetune_trainer.data.cache import cache_key
    from kubetune_trainer.prepare import cache_parts
    from kubetune_trainer.tasks import task_for

    def key(quality: dict) -> str:
        config = TrainerConfig.model_validate({"jobName": "q", "baseModel": {"uri": "s3://m/"},
                                               "dataset": {"train": "s3://d/t.jsonl", "quality": quality},
                                               "output": {"uri": "s3://o/"}})
        task = task_for(config, planted / "model")
        return cache_key(cache_parts(config, task, {"datasets": {"train": "x"}, "tokenizer": "y"}))

    assert key({}) != key({"duplicates": "warn"}) != key({"nearThreshold": 0.9})


def test_bad_input_gets_a_message_not_a_crash(tmp_path):
    """A 1-record split, every record identical, empty texts, a 5 MB record."""
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    same = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    big = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 1_000_000}]}
    empty = {"messages": [{"role": "user", "content": "?!"}, {"role": "assistant", "content": "..."}]}
    for train, test, code in (([same], [same], 65), ([same] * 50, [same], 65), ([big, same], [same], 0),
                              ([empty, empty, same], [big], 0)):
        write_jsonl(tmp_path / "train.jsonl", train)
        write_jsonl(tmp_path / "test.jsonl", test)
        done, log = validate(tmp_path, {"duplicates": "drop"}, "--json")
        assert done.exit_code == code, done.output
        if code:  # nothing left to train on once the test's copies are dropped: said so
            assert "records left after the data-quality checks dropped" in log, log
        else:
            assert json.loads(done.stdout)["splits"]["train"]["samples"] == len(train) - 1


TOPICS = {"billing": "invoice refund charge payment card receipt price bill discount coupon".split(),
          "shipping": "parcel delivery courier tracking address package truck warehouse route arrival".split(),
          "account": "password login profile email username reset security session verify settings".split(),
          "rare": "warranty repair broken screen battery replace fix technician defect service".split()}


def classification(tmp_path, rng: random.Random) -> dict:
    """train: 3 topics x 100 texts, 6 of a rare one, 25 texts repeated under another label (conflicts), 30 flipped
    labels; test: 30 of its own and 2 of a class train never has. Returns the planted lines (1-based)."""
    common = [t for t in TOPICS if t != "rare"]
    train = [{"text": " ".join(rng.choice(TOPICS[t]) for _ in range(12)), "label": t}
             for t in common for _ in range(100)]
    rng.shuffle(train)
    flipped = sorted(rng.sample(range(len(train)), 30))
    for i in flipped:
        train[i]["label"] = rng.choice([t for t in common if t != train[i]["label"]])
    train += [{"text": " ".join(rng.choice(TOPICS["rare"]) for _ in range(12)), "label": "rare"} for _ in range(6)]
    conflicts = [{"text": train[i]["text"], "label": next(t for t in common if t != train[i]["label"])}
                 for i in range(0, 50, 2) if i not in flipped]
    train += conflicts
    test = [{"text": " ".join(rng.choice(TOPICS[t]) for _ in range(12)), "label": t} for t in common for _ in range(10)]
    test += [{"text": "a question about something else entirely", "label": "other"} for _ in range(2)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{}")
    return {"flipped": [i + 1 for i in flipped], "conflicts": len(conflicts)}


def test_classification_labels_conflicts_suspects_rare_and_unseen_classes(tmp_path):
    planted = classification(tmp_path, random.Random(3))
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "topics"},
           "spec": {"task": "sequence-classification", "baseModel": {"uri": str(tmp_path / "model")},
                    "dataset": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"),
                                "labels": ["account", "billing", "other", "rare", "shipping"]},
                    "output": {"uri": str(tmp_path / "out") + "/"}}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    done = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "job.yaml"), "--json"],
                              env={"COLUMNS": "160", "KUBETUNE_TERMINATION_LOG": str(tmp_path / "log")})
    assert done.exit_code == 0, done.output
    labels = json.loads(done.stdout)["quality"]["labels"]
    # each conflicting text is there twice, under two labels: both copies are named
    assert labels["conflicts"] == 2 * planted["conflicts"], labels["conflicts"]
    assert labels["rare"] == ["rare"] and labels["unseen"] == {"test": ["other"]}
    assert labels["classes"]["rare"] == 6
    suspected = set(labels["suspected"]["lines"])
    found = suspected & set(planted["flipped"])
    assert len(found) >= 0.6 * len(planted["flipped"]), (len(found), len(suspected))
    assert len(found) >= 0.5 * len(suspected - set(range(307, 400))), (len(found), len(suspected))


def classify(tmp_path, quality: dict):
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "topics"},
           "spec": {"task": "sequence-classification", "baseModel": {"uri": str(tmp_path / "model")},
                    "dataset": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl"),
                                "labels": ["account", "billing", "other", "rare", "shipping"], "quality": quality},
                    "output": {"uri": str(tmp_path / "out") + "/"}}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    done = CliRunner().invoke(app, ["validate", "--config", str(tmp_path / "job.yaml"), "--json"],
                              env={"COLUMNS": "160", "KUBETUNE_TERMINATION_LOG": str(tmp_path / "log")})
    return done, (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""


def test_label_checks_drop_with_fingerprints_and_fail_naming_the_lines(tmp_path):
    """conflicts: drop removes every copy of a conflicting text and records each dropped record's fingerprint;
    labelErrors: fail refuses the data naming its first lines and the field."""
    planted = classification(tmp_path, random.Random(3))
    done, _ = classify(tmp_path, {"conflicts": "drop", "labelErrors": "off"})
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    dropped = report["quality"]["dropped"]["train"]
    # each conflicting text twice: its repeat (dropped as a duplicate) and its first copy (dropped as a conflict)
    assert dropped["count"] == 2 * planted["conflicts"] == len(dropped["fingerprints"]), dropped
    assert dropped["lines"] == sorted(dropped["lines"])
    pairs = dict(zip(dropped["lines"], dropped["fingerprints"], strict=True))
    firsts, repeats = ({fp for line, fp in pairs.items() if (line > 306) == later} for later in (False, True))
    assert firsts == repeats and len(firsts) == planted["conflicts"]  # a text's two copies, one fingerprint
    assert report["splits"]["train"]["samples"] == 306 + planted["conflicts"] - dropped["count"]
    done, log = classify(tmp_path, {"labelErrors": "fail"})
    assert done.exit_code == 65, done.output
    assert "have a suspect label (lines " in log and "dataset.quality.labelErrors to drop or warn" in log, log


def test_images_the_test_split_shares_with_train_by_content(tmp_path):
    """Images: a byte copy of a train image under another name, and one re-encoded a little brighter, in the test
    split: both found (exact, near), and with the default policy their train copies leave the train examples."""
    import numpy as np
    from kubetune_api import TrainerConfig
    from kubetune_dev.tiny_vision import make_tiny_vit
    from kubetune_trainer.fetch import fetch
    from kubetune_trainer.prepare import validate_splits
    from kubetune_trainer.tasks import task_for
    from PIL import Image

    from tests.trainer.test_image_classification import LABELS, write_split

    vit = make_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2)
    data = tmp_path / "data"
    train = write_split(data, "train", LABELS * 4, seed=0)
    test = write_split(data, "test", LABELS * 2, seed=1)
    (data / "images/test/copy.png").write_bytes((data / "images/train/0.png").read_bytes())
    brighter = np.clip(np.asarray(Image.open(data / "images/train/1.png"), dtype=np.float32) * 1.03, 0, 255)
    Image.fromarray(np.uint8(brighter)).save(data / "images/test/near.png")
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    rows[0] = {"image": "images/test/copy.png", "label": LABELS[0]}
    rows[1] = {"image": "images/test/near.png", "label": LABELS[1]}
    write_jsonl(test, rows)
    config = TrainerConfig.model_validate({
        "jobName": "img-quality", "task": "image-classification", "baseModel": {"uri": str(vit)},
        "dataset": {"train": str(train), "test": str(test)}, "output": {"uri": str(tmp_path / "out")},
        "workDir": str(tmp_path / "work")})
    fetched = fetch(config, None, weights=False)
    task = task_for(config, fetched.model_dir)
    task.load_processor()
    reports = validate_splits(config, task, fetched)
    leak = reports["test"].quality["leakage"]
    assert (leak["exact"], leak["near"], leak["lines"]) == (1, 1, [1, 2]), leak
    assert reports["train"].quality["dropped"]["lines"] == [1, 2]
    assert reports["train"].samples == 10 and len(task.examples("train", fetched.splits["train"],
                                                                 fetched.uris["train"], "auto")) == 10


def test_image_labels_confident_learning_suspects_finds_flipped_ones(tmp_path):
    """Images: 60 train images of three classes that differ in brightness and layout, 6 of them labelled as another
    class: warn reports most of them as suspected; fail refuses the data naming the lines and the field; drop
    leaves them out of the train examples, each with its image's fingerprint."""
    from kubetune_api import TrainerConfig
    from kubetune_dev.tiny_vision import make_tiny_vit
    from kubetune_trainer.errors import DatasetError
    from kubetune_trainer.fetch import fetch
    from kubetune_trainer.prepare import validate_splits
    from kubetune_trainer.tasks import task_for

    from tests.trainer.test_image_classification import LABELS, write_split

    vit = make_tiny_vit(tmp_path / "vit", image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2)
    truth = LABELS * 20
    flipped = {4, 17, 25, 33, 48, 56}
    train = write_split(tmp_path / "data", "train", truth, seed=0, **{
        str(i): {"image": f"images/train/{i}.png", "label": LABELS[(LABELS.index(truth[i]) + 1) % 3]}
        for i in flipped})

    def validated(action: str):
        config = TrainerConfig.model_validate({
            "jobName": "img-labels", "task": "image-classification", "baseModel": {"uri": str(vit)},
            "dataset": {"train": str(train), "quality": {"labelErrors": action}},
            "output": {"uri": str(tmp_path / "out")}, "workDir": str(tmp_path / f"work-{action}")})
        fetched = fetch(config, None, weights=False)
        task = task_for(config, fetched.model_dir)
        task.load_processor()
        return validate_splits(config, task, fetched)["train"]

    lines = {i + 1 for i in flipped}
    suspected = validated("warn").quality["labels"]["suspected"]
    found = lines & set(suspected["lines"])
    assert len(found) >= 0.6 * len(lines) and len(found) >= 0.5 * suspected["count"], suspected
    with pytest.raises(DatasetError) as refused:
        validated("fail")
    assert "have a suspect label (lines " in str(refused.value) and "labelErrors" in str(refused.value)
    report = validated("drop")
    assert report.samples == 60 - suspected["count"]
    assert report.quality["dropped"]["lines"] == suspected["lines"]
    assert len(report.quality["dropped"]["fingerprints"]) == suspected["count"]
