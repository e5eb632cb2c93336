"""Small, deterministic demo datasets: a toy support bot, generic text for a tiny base, benchmark samples.

The support bot answers in a fixed, learnable shape: a topic tag, the one canned sentence for that topic
and a signature. A tiny base model that read such text only as plain text, never in the chat format, does
not answer that way, so a couple of minutes of LoRA visibly changes its answer to `HELD_OUT_PROMPT`, a
product/topic/order combination that appears in no split.

Everything is a pure function of the seed: the same call writes byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

# The demo's size (make demo, make dev-cluster): its training split's records and its base model's pre-training steps.
DEMO_TRAIN_RECORDS = 480
DEMO_PRETRAIN_STEPS = 300

SYSTEM = "You are Kubi, the support assistant of Kubetune Cloud."
PRODUCTS = ["Orbit", "Nimbus", "Harbor", "Quasar", "Lumen", "Atlas"]
TOPICS = {
    "billing": (
        ["I was charged twice for order {n}.", "Why is there a double charge on order {n}?",
         "Please refund the extra payment for order {n}.", "My card was billed two times for order {n}."],
        "I have refunded the duplicate charge; it reaches your card in 3 to 5 days.",
    ),
    "password": (
        ["I cannot log in to my {p} account, order {n}.", "How do I reset my {p} password? Order {n}.",
         "I forgot my password for {p}, order {n}.", "My {p} login is locked, order {n}."],
        "I have sent a password reset link to the email on your account.",
    ),
    "shipping": (
        ["Where is my order {n}?", "Order {n} has not arrived yet.", "When will order {n} be delivered?",
         "Can you track my {p} order {n}?"],
        "Your parcel left our warehouse and arrives within 2 working days.",
    ),
    "cancel": (
        ["Please cancel my {p} subscription, order {n}.", "I want to stop my {p} plan, order {n}.",
         "How do I cancel order {n}?", "Cancel {p} for me please, order {n}."],
        "Your subscription is cancelled and you will not be charged again.",
    ),
    "upgrade": (
        ["I want to upgrade my {p} plan, order {n}.", "Can I move order {n} to the bigger {p} tier?",
         "How do I get more storage on {p}? Order {n}.", "Please upgrade order {n} to {p} Pro."],
        "Your plan is upgraded and the new limits apply right away.",
    ),
    "bug": (
        ["The {p} app crashes when I open it, order {n}.", "{p} shows an error on start, order {n}.",
         "My {p} dashboard is blank, order {n}.", "{p} keeps freezing, order {n}."],
        "I have opened a bug report and our engineers will email you a fix.",
    ),
}
GREETINGS = ["", "Hi, ", "Hello, ", "Hey there, ", "Good morning, ", "Hi Kubi, "]
CLOSINGS = ["", " Thanks!", " Thank you.", " Please help.", " Cheers."]

# Held out from every split: "shipping" x "Quasar" x this order number never appears in training.
HELD_OUT = ("shipping", "Quasar", 4817)
HELD_OUT_PROMPT = "Hello, can you track my Quasar order 4817? Thanks!"


def support_answer(topic: str) -> str:
    return f"[{topic}] {TOPICS[topic][1]} - Kubi, Kubetune Support"


def support_record(rng: random.Random) -> tuple[tuple[str, str, int], dict]:
    topic = rng.choice(sorted(TOPICS))
    product = rng.choice(PRODUCTS)
    order = rng.randrange(1000, 10000)
    question = rng.choice(TOPICS[topic][0]).format(p=product, n=order)
    prompt = rng.choice(GREETINGS) + question + rng.choice(CLOSINGS)
    prompt = prompt[0].upper() + prompt[1:]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": support_answer(topic)},
    ]
    return (topic, product, order), {"messages": messages}


def held_out_messages() -> list[dict]:
    """The demo's question: system + user messages, ready for the chat template."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": HELD_OUT_PROMPT}]


def support_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records: list[dict] = []
    while len(records) < n:
        (topic, product, order), record = support_record(rng)
        if (topic, product) == HELD_OUT[:2] or order == HELD_OUT[2]:
            continue
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_support_dataset(out_dir: Path, *, train: int = DEMO_TRAIN_RECORDS, validation: int = 48, test: int = 48,
                          seed: int = 0) -> dict[str, Path]:
    """train.jsonl, validation.jsonl and test.jsonl in chat format; returns {split: path}."""
    return write_splits(out_dir, support_records(train + validation + test, seed), train, validation)


UNHELPFUL = ["I do not know.", "Please ask someone else about that.", "Try turning it off and on again.",
             "That is not something I can look at.", "Maybe it works tomorrow.", "No idea, sorry."]


def preference_records(n: int, seed: int = 0) -> list[dict]:
    """Support questions as preference pairs: the system and user turns as the prompt, the topic's canned answer
    chosen, an unhelpful reply rejected."""
    rng = random.Random(seed + 1)
    out = []
    for record in support_records(n, seed):
        *prompt, answer = record["messages"]
        out.append({"prompt": prompt, "chosen": [answer],
                    "rejected": [{"role": "assistant", "content": rng.choice(UNHELPFUL)}]})
    return out


def write_preference_dataset(out_dir: Path, *, train: int = 192, validation: int = 32, test: int = 32,
                             seed: int = 0) -> dict[str, Path]:
    """train.jsonl, validation.jsonl and test.jsonl of preference pairs; returns {split: path}."""
    return write_splits(out_dir, preference_records(train + validation + test, seed), train, validation)


def write_splits(out_dir: Path, records: list[dict], train: int, validation: int) -> dict[str, Path]:
    """The first `train` records as train.jsonl, the next `validation` as validation.jsonl, the rest test.jsonl."""
    splits = {"train": records[:train], "validation": records[train:train + validation],
              "test": records[train + validation:]}
    return {name: write_jsonl(Path(out_dir) / f"{name}.jsonl", recs) for name, recs in splits.items()}


# Generic text: simple English about everyday things, so a pre-trained tiny base writes plausible words.
_SUBJECTS = ["The old man", "A young woman", "The small dog", "Our team", "The farmer", "My neighbour",
             "The teacher", "A tired driver", "The city council", "The children", "A quiet student",
             "The shop owner", "The engineer", "Her brother", "The cat"]
_VERBS = ["walked to", "looked at", "painted", "cleaned", "visited", "talked about", "found", "built",
          "opened", "carried", "repaired", "watched", "wrote about", "closed", "forgot"]
_OBJECTS = ["the river", "a red door", "the market", "the new bridge", "an old book", "the garden",
            "the kitchen", "a long letter", "the train station", "the blue car", "the school", "a warm coat",
            "the harbour", "the library", "a wooden table"]
_TAILS = ["in the morning", "after lunch", "before the rain", "with a smile", "on Sunday", "for an hour",
          "without a word", "near the park", "at night", "once again", "in the summer", "by the window"]
_LINKS = ["Then", "Later", "After that", "Meanwhile", "Soon", "In the evening", "Of course"]


def _sentence(rng: random.Random, first: bool) -> str:
    start = rng.choice(_SUBJECTS)
    if not first and rng.random() < 0.4:
        start = f"{rng.choice(_LINKS)} {start[0].lower()}{start[1:]}"
    return f"{start} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def generic_texts(n: int = 1500, seed: int = 0) -> list[str]:
    """`n` short paragraphs of 2 to 6 simple sentences."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng, i == 0) for i in range(rng.randint(2, 6))) for _ in range(n)]


def chat_texts(records: list[dict]) -> list[str]:
    """The message contents of chat records, e.g. to train a tokenizer that knows the support bot's words."""
    return [m["content"] for r in records for m in r["messages"]]


def demo_base_texts() -> list[str]:
    """What the demo's tiny base reads in pre-training: generic English and support conversations as plain
    text, never in the chat format (`make demo` and `make dev-cluster` build the same base)."""
    return generic_texts(1500) + chat_texts(support_records(600, seed=7))


def write_pretraining_text(out_dir: Path, n: int = 1500, seed: int = 0) -> Path:
    """pretrain.jsonl: {"text": ...} records of generic text."""
    return write_jsonl(Path(out_dir) / "pretrain.jsonl", [{"text": t} for t in generic_texts(n, seed)])


def benchmark_texts(n: int = 2000, *, min_words: int = 12, max_words: int = 400, seed: int = 0) -> list[str]:
    """`n` texts whose lengths are log-uniform in [min_words, max_words] (roughly 16..512 tokens):
    many short samples and a long tail, like real instruction data, so padding matters."""
    rng = random.Random(seed)
    words = " ".join(generic_texts(400, seed)).split()
    texts = []
    for _ in range(n):
        length = round(math.exp(rng.uniform(math.log(min_words), math.log(max_words))))
        start = rng.randrange(len(words) - length)
        texts.append(" ".join(words[start:start + length]))
    return texts


def write_benchmark_dataset(out_dir: Path, n: int = 2000, *, min_words: int = 12, max_words: int = 400,
                            seed: int = 0) -> Path:
    """bench.jsonl: {"text": ...} records of widely varying length."""
    texts = benchmark_texts(n, min_words=min_words, max_words=max_words, seed=seed)
    return write_jsonl(Path(out_dir) / "bench.jsonl", [{"text": t} for t in texts])
