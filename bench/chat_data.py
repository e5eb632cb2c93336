"""Generated data for bench/bench_data.py: chats that read like people's, and labelled texts for the label check.

`varied_chats`: the support bot's conversations (`kubetune_dev.demo_data.support_record`: the system prompt, a
templated question, the topic's canned answer), where the customer also describes the problem in their own words
and the answer adds a few of its own: 10-60 and 10-40 words drawn from a Zipf distribution over 20,000 made-up words
(a frequent few, a long tail, as in written language). Two such chats share their template, never most of their
words, as two people's chats do: near copies (Jaccard >= 0.8 of word 3-shingles) are rare. `templated` chats (the
support records alone) are the worst case for the near-copy check: nearly every record is a near copy of many
others.

`planted_test_split`: a test split of another seed where every 100th record is a train record with one word
changed (1% leakage, as a carelessly made split might hold).

`labelled_texts`: texts of `classes` topics (each topic's own frequent words over a shared Zipf background), with
`flip` of the labels changed to another class: the label-error check's recall and precision are known.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
VOCABULARY = 20_000
CHUNK = 10_000  # records whose words are drawn in one call


def vocabulary(n: int = VOCABULARY, seed: int = 1234) -> list[str]:
    """`n` distinct made-up words of 2-4 syllables, in a fixed order (the first ones are the most frequent)."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))] = None
    return list(words)


def zipf_weights(n: int, exponent: float = 1.05, shift: float = 2.7) -> np.ndarray:
    """Zipf-Mandelbrot probabilities of ranks 1..n."""
    weights = 1.0 / (np.arange(1, n + 1) + shift) ** exponent
    return weights / weights.sum()


def _phrases(rng: np.random.Generator, words: np.ndarray, p: np.ndarray, count: int, low: int,
             high: int) -> list[str]:
    lengths = rng.integers(low, high + 1, count)
    drawn = words[rng.choice(words.size, size=int(lengths.sum()), p=p)]
    ends = np.cumsum(lengths)
    return [" ".join(drawn[end - n:end]) + "." for n, end in zip(lengths, ends, strict=True)]


def varied_chats(n: int, seed: int = 0) -> Iterator[dict]:
    """`n` support chats with the customer's and the bot's own words (see the module's docstring)."""
    from kubetune_dev.demo_data import support_record

    template_rng = random.Random(seed)
    rng = np.random.default_rng(seed)
    words, p = np.array(vocabulary()), zipf_weights(VOCABULARY)
    for start in range(0, n, CHUNK):  # whole chunks drawn, so the first k records are the same for every n >= k
        asked, answered = _phrases(rng, words, p, CHUNK, 10, 60), _phrases(rng, words, p, CHUNK, 10, 40)
        for own_question, own_answer in list(zip(asked, answered, strict=True))[:n - start]:
            record = support_record(template_rng)[1]
            system, user, assistant = record["messages"]
            user["content"] += " " + own_question.capitalize()
            assistant["content"] = assistant["content"].replace(" - Kubi", " " + own_answer.capitalize() + " - Kubi")
            yield record


def templated_chats(n: int, seed: int = 0) -> Iterator[dict]:
    from kubetune_dev.demo_data import support_record

    rng = random.Random(seed)
    for _ in range(n):
        yield support_record(rng)[1]


def planted_test_split(chats, n: int, train_seed: int, seed: int, every: int = 100) -> Iterator[dict]:
    """`n` records of `chats(n, seed)`, every `every`-th replaced by a train record (`chats(.., train_seed)`) whose
    user message has one word changed."""
    train = chats(n // every + 1, train_seed)
    for i, record in enumerate(chats(n, seed)):
        if i % every == 0:
            record = next(train)
            user = record["messages"][1]
            user["content"] = user["content"].replace(" ", " changed ", 1)
        yield record


def labelled_texts(n: int, classes: int = 20, flip: float = 0.05, seed: int = 0) -> tuple[list[str], list[int], set]:
    """(texts, labels, the indexes whose label was flipped)."""
    rng = np.random.default_rng(seed)
    words, p = np.array(vocabulary()), zipf_weights(VOCABULARY)
    topic_words = words[rng.permutation(words.size)[:classes * 30]].reshape(classes, 30)
    truth = rng.integers(0, classes, n)
    texts = []
    for label in truth:
        background = words[rng.choice(words.size, size=int(rng.integers(8, 30)), p=p)]
        own = topic_words[label][rng.integers(0, 30, int(rng.integers(2, 6)))]
        texts.append(" ".join(rng.permutation(np.concatenate([background, own]))))
    labels = truth.copy()
    flipped = set(rng.choice(n, size=int(n * flip), replace=False).tolist())
    for i in flipped:
        labels[i] = (truth[i] + int(rng.integers(1, classes))) % classes
    return texts, labels.tolist(), flipped
