"""Data-quality checks (issue 29): near copies between the splits and label checks, on generated data with planted
problems (fixed seeds), against the exact Jaccard similarity and cleanlab's own API as references."""

from __future__ import annotations

import io
import random
from multiprocessing import get_context

import numpy as np
import pytest
from cleanlab.filter import find_label_issues
from kubetune_trainer.quality.labels import (
    class_counts,
    conflicts,
    out_of_fold_probabilities,
    rare_classes,
    suspected_image_label_errors,
    suspected_label_errors,
    text_features,
    unseen_classes,
)
from kubetune_trainer.quality.near import SHINGLE, ImageIndex, NearIndex
from kubetune_trainer.quality.pii import scan
from PIL import Image, ImageDraw, ImageEnhance
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

VOCAB = [f"w{i}" for i in range(400)]
TOPICS = {label: [f"{label}{i}" for i in range(80)] for label in ("sport", "food", "tech")}


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def five_megabytes(seed: int) -> str:
    """A 5 MB text of random words (about 1.2 million)."""
    return " ".join(np.array(VOCAB)[np.random.default_rng(seed).integers(0, len(VOCAB), 1_300_000)])[:5_000_000]


def true_jaccard(a: str, b: str, n: int = SHINGLE) -> float:
    """The reference: Jaccard similarity of the sets of word n-gram tuples (the whole text if shorter)."""
    def grams(text: str) -> set:
        words = text.split()
        return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def edit(rng: random.Random, text: str, edits: int) -> str:
    """The text with `edits` words changed, inserted or deleted."""
    words = text.split()
    for _ in range(edits):
        where = rng.randrange(len(words))
        kind = rng.choice(("change", "insert", "delete"))
        if kind == "change":
            words[where] = rng.choice(VOCAB)
        elif kind == "insert":
            words.insert(where, rng.choice(VOCAB))
        else:
            del words[where]
    return " ".join(words)


def near_copy(rng: random.Random, text: str, low: float = 0.8) -> str:
    """A copy with 1-2 edits whose true Jaccard with the text is at or above `low` (planted above the threshold)."""
    while True:
        copy = edit(rng, text, rng.choice((1, 2)))
        if copy != text and true_jaccard(copy, text) >= low:
            return copy


# --- near copies ------------------------------------------------------------------------------------------------


def test_planted_near_and_exact_copies_are_found_without_false_positives():
    rng = random.Random(7)
    train = [sentence(rng, rng.randint(40, 90)) for _ in range(500)]
    planted = rng.sample(range(len(train)), 70)
    near_sources, exact_sources = planted[:50], planted[50:]
    test = ([near_copy(rng, train[i]) for i in near_sources] + [train[i] for i in exact_sources]
            + [sentence(rng, rng.randint(40, 90)) for _ in range(130)])
    index = NearIndex()
    for line, text in enumerate(test, start=1):
        index.add(("test", line), text)
    assert len(index) == 200

    found = {i: index.query(text) for i, text in enumerate(train)}
    recall = sum(("test", k + 1) in found[i] for k, i in enumerate(planted)) / len(planted)
    assert recall >= 0.9
    # No train record without a planted copy matches anything, and no clean test record is ever matched.
    clean_keys = {("test", line) for line in range(71, 201)}
    assert all(not found[i] for i in set(range(len(train))) - set(planted))
    assert not clean_keys & {key for keys in found.values() for key in keys}


def test_decisions_agree_with_the_exact_jaccard():
    rng = random.Random(11)
    sources = [sentence(rng, rng.randint(30, 120)) for _ in range(150)]
    # A mixed set: copies with 0 to 12 edits spread Jaccard from 1 down to about 0.3, around the threshold.
    copies = [edit(rng, text, rng.randint(0, 12)) for text in sources]
    index = NearIndex(threshold=0.8)
    for i, text in enumerate(copies):
        index.add(i, text)
    expected = [true_jaccard(text, copies[i]) >= 0.8 for i, text in enumerate(sources)]
    decided = [i in index.query(text) for i, text in enumerate(sources)]
    assert 30 < sum(expected) < 120  # both sides of the threshold are well represented
    assert not any(d and not e for d, e in zip(decided, expected, strict=True))  # never above when it is below
    assert sum(d == e for d, e in zip(decided, expected, strict=True)) / len(expected) >= 0.98


def test_short_texts_empty_texts_and_an_empty_index():
    assert NearIndex().query("anything at all here") == []
    index = NearIndex()
    index.add("short", "hello world")  # fewer words than a shingle: the whole text is one shingle
    index.add("empty", "")
    index.add("long", "one two three four five six")
    assert len(index) == 3
    assert index.query("hello world") == ["short"]
    assert index.query("hello") == []
    assert index.query("") == []
    assert index.query("one two three four five six") == ["long"]
    for key in ("short", "empty"):
        with pytest.raises(ValueError):
            index.add(key, "again")


def test_a_5_mb_text_is_queried_and_indexed():
    rng = random.Random(3)
    big = five_megabytes(3)
    index = NearIndex()
    index.add("small", sentence(rng, 50))
    assert index.query(big) == []
    index.add("big", big)
    assert index.query(big) == ["big"]


_FORKED: NearIndex | None = None


def _query_in_worker(text: str) -> list:
    return _FORKED.query(text)


def test_the_index_works_in_forked_workers():
    global _FORKED
    rng = random.Random(5)
    texts = [sentence(rng, 60) for _ in range(20)]
    _FORKED = NearIndex()
    for i, text in enumerate(texts):
        _FORKED.add(("test", i + 1), text)
    queries = [near_copy(rng, text) for text in texts[:10]] + [sentence(rng, 60) for _ in range(5)]
    with get_context("fork").Pool(2) as pool:
        assert pool.map(_query_in_worker, queries) == [_FORKED.query(q) for q in queries]
    assert [_FORKED.query(q) for q in queries][:10] == [[("test", i + 1)] for i in range(10)]


# --- images -----------------------------------------------------------------------------------------------------


def picture(seed: int, size: int = 96) -> Image.Image:
    """A picture of a few random shapes on a gradient (a different layout per seed)."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        color = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x, y, x + rng.randint(10, 40), y + rng.randint(10, 40)), fill=color)
    return image


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# Made-up credentials of each shape pii.py knows (AWS's documented example key id among them).
SECRETS = ["AKIAIOSFODNN7EXAMPLE", "-----BEGIN RSA PRIVATE KEY-----", "Bearer abcdefghijklmnopqrstuvwxyz012345",
           "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
           "ghp_" + "a1" * 18, "xoxb-1234567890-abcdefghij", "sk_live_" + "x" * 24, "AIza" + "B" * 35]


@pytest.mark.parametrize("secret", SECRETS)
def test_each_kind_of_secret_is_found_as_a_word_of_its_own(secret):
    assert scan(f"my key: {secret} thanks") == {"secret": 1}
    assert scan(f"{secret}") == {"secret": 1}
    if secret[0].isalnum():  # inside a longer word it is no credential
        assert scan(f"x{secret}") == {}


def test_personal_data_is_counted_by_kind():
    text = ("Write to jane.doe@example.com or j.roe@example.org, call +1 650-253-0000, "
            "card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE")
    assert scan(text) == {"email": 2, "phone": 1, "card": 1, "secret": 1}
    # Order numbers, a card number failing the Luhn check and an @ without an address are none of them.
    assert scan("order 4817 of 2026, ref 4111 1111 1111 1112, ping me @ noon") == {}


def test_images_exact_near_and_different():
    index = ImageIndex()
    original = picture(1)
    index.add(("test", 1), png(original))
    index.add(("test", 2), png(picture(2)))
    index.add(("test", 3), b"not an image")  # does not decode: only its exact copies are found
    assert index.query(png(original)) == ([("test", 1)], [])
    assert index.query(png(ImageEnhance.Brightness(original).enhance(1.05))) == ([], [("test", 1)])
    assert index.query(png(original.resize((80, 80)))) == ([], [("test", 1)])
    assert index.query(png(picture(3))) == ([], [])
    assert index.query(b"not an image") == ([("test", 3)], [])
    assert index.query(b"") == ([], [])
    assert ImageIndex().query(png(original)) == ([], [])


# --- labels: counts, conflicts, rare and unseen classes ------------------------------------------------------------


def test_conflicts_counts_rare_and_unseen():
    keys = ["a", "b", "a", "c", "b", "a"]
    assert conflicts(keys, ["x", "y", "z", "x", "y", "x"]) == [0, 2, 5]
    assert conflicts(keys, ["x"] * 6) == []
    assert conflicts([], []) == []
    assert class_counts(["b", "a", "b", "c", "b", "a"]) == {"b": 3, "a": 2, "c": 1}
    assert list(class_counts(["b", "a", "b", "c", "b", "a"])) == ["b", "a", "c"]
    counts = {"big": 90, "mid": 30, "small": 5, "tiny": 2}  # mean 31.75
    assert rare_classes(counts, 0.25) == ["tiny", "small"]
    assert rare_classes(counts, 1.0) == ["tiny", "small", "mid"]
    assert rare_classes({}, 0.25) == []
    assert unseen_classes({"a": 3, "b": 1}, {"a": 1, "c": 2, "d": 0, "b": 4}) == ["c"]
    assert unseen_classes({}, {}) == []


# --- labels: suspected label errors -------------------------------------------------------------------------------


def topical(rng: random.Random, n: int, flip: float) -> tuple[list[str], list[str], set[int]]:
    """n texts of 3 topics (a topic's own words among common ones), a share `flip` of the labels flipped."""
    texts, labels, flipped = [], [], set()
    for i in range(n):
        topic = rng.choice(list(TOPICS))
        words = [rng.choice(TOPICS[topic]) if rng.random() < 0.3 else rng.choice(VOCAB) for _ in range(20)]
        texts.append(" ".join(words))
        if rng.random() < flip:
            labels.append(rng.choice([t for t in TOPICS if t != topic]))
            flipped.add(i)
        else:
            labels.append(topic)
    return texts, labels, flipped


def test_flipped_labels_are_suspected():
    texts, labels, flipped = topical(random.Random(0), 600, 0.1)
    suspected = suspected_label_errors(texts, labels)
    assert suspected == sorted(suspected) == suspected_label_errors(texts, labels)  # sorted, and the same every time
    hits = len(flipped & set(suspected))
    assert hits / len(flipped) >= 0.6
    assert hits / len(suspected) >= 0.5


def test_the_result_is_cleanlabs_on_the_same_out_of_fold_probabilities():
    texts, labels, _ = topical(random.Random(1), 80, 0.15)
    labels[0] = "alone"  # a single-record class: left out of the model
    features = text_features(texts)
    kept, classes, probabilities = out_of_fold_probabilities(features, labels, seed=4)
    assert 0 not in kept and len(kept) == 79
    # The reference flow built here: same features, stratified folds, logistic regression, then cleanlab directly.
    names = sorted(set(labels) - {"alone"})
    reference_classes = np.array([names.index(labels[i]) for i in kept])
    folds = StratifiedKFold(n_splits=min(5, min(np.bincount(reference_classes))), shuffle=True, random_state=4)
    model = LogisticRegression(solver="sag", tol=1e-3, max_iter=200, random_state=4)
    reference = cross_val_predict(model, features[kept], reference_classes, cv=folds, method="predict_proba")
    assert (classes == reference_classes).all()
    np.testing.assert_allclose(probabilities, reference, rtol=1e-6, atol=1e-9)
    expected = sorted(int(kept[i]) for i in np.flatnonzero(find_label_issues(reference_classes, reference)))
    assert expected  # the toy set has issues to find
    assert suspected_label_errors(texts, labels, seed=4) == expected


def test_the_features_are_tfidf_of_word_unigrams_and_bigrams():
    texts = ["the game was great", "the soup was cold", "a new phone", "the game was cold", "a new game"]
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, dtype=np.float32)
    reference = vectorizer.fit_transform(texts)
    np.testing.assert_allclose(text_features(texts).toarray(), reference.toarray())


@pytest.mark.parametrize("texts, labels", [
    (["one record"], ["a"]),
    (["same text"] * 30, ["a", "b", "c"] * 10),
    ([f"text number {i}" for i in range(30)], ["only"] * 30),
    ([""] * 30, ["a", "b"] * 15),
    (["", " ", "  "] * 10, ["a", "b", "c"] * 10),
    ([f"text {i}" for i in range(8)], ["a", "b"] * 4),  # under MIN_RECORDS
    ([f"text {i}" for i in range(30)], [f"class {i}" for i in range(30)]),  # every class a single record
    ([f"text {i}" for i in range(30)], ["a", "b"] * 14),  # lengths differ
], ids=["one", "identical", "single-class", "empty", "whitespace", "few", "singletons", "lengths"])
def test_bad_input_suspects_nothing_and_never_crashes(texts, labels):
    assert suspected_label_errors(texts, labels) == []


def test_a_5_mb_text_and_odd_labels_do_not_crash():
    texts, labels, _ = topical(random.Random(2), 60, 0.0)
    texts[0] = five_megabytes(9)
    labels = [f"{label} ✓ {{x}}" for label in labels]  # labels are any strings
    assert set(suspected_label_errors(texts, labels)) <= set(range(60))


# --- labels: images ------------------------------------------------------------------------------------------------


def colored(rng: random.Random, label: str) -> Image.Image:
    """A noisy 24x24 image whose dominant channel is the class's."""
    pixels = rng_array(rng, (24, 24, 3), 0, 90)
    pixels[..., ("red", "green", "blue").index(label)] += 150
    return Image.fromarray(pixels.astype(np.uint8))


def rng_array(rng: random.Random, shape, low: int, high: int) -> np.ndarray:
    return np.random.default_rng(rng.randrange(2**32)).integers(low, high, shape)


def test_flipped_image_labels_are_suspected_and_broken_images_left_out():
    rng = random.Random(0)
    truth = [rng.choice(("red", "green", "blue")) for _ in range(150)]
    images = [colored(rng, label) for label in truth]
    labels = list(truth)
    flipped = set(rng.sample(range(150), 15))
    for i in flipped:
        labels[i] = next(c for c in ("red", "green", "blue") if c != truth[i])
    images[3] = None  # not decoded: left out
    suspected = suspected_image_label_errors(images, labels)
    assert 3 not in suspected
    hits = len(flipped & set(suspected))
    assert hits / len(flipped - {3}) >= 0.6 and hits / len(suspected) >= 0.5
    assert suspected_image_label_errors(images[:1], labels[:1]) == []
    assert suspected_image_label_errors([images[0]] * 20, ["red", "blue"] * 10) == []
    assert suspected_image_label_errors([None] * 20, ["red", "blue"] * 10) == []

