"""Label checks for classification tasks: conflicts, class counts, rare and unseen classes, suspected label errors.

Suspected label errors are cleanlab's confident learning (`cleanlab.filter.find_label_issues`) on out-of-fold
predicted probabilities of a cheap CPU model (`out_of_fold_probabilities`): a record is suspected when a model that
never saw it confidently predicts another class than its label, beyond the noise cleanlab estimates per class pair.
These are candidates for a human to look at, not certain errors: a model this simple also flags hard or ambiguous
records, and misses errors between classes it cannot tell apart.

The model cannot judge (no record is suspected) with fewer than MIN_RECORDS records, fewer than 2 classes, or
texts (images) that give no feature at all. A class with a single record cannot be held out and predicted by a model
that saw its class, so such records are left out of the model (they are never suspected; `rare_classes` names them).
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from os import PathLike

import numpy as np
from cleanlab.filter import find_label_issues
from kubetune_api import QualityAction, QualitySpec
from PIL import Image
from scipy import sparse
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

MIN_RECORDS = 10
FOLDS = 5
# Features for images: a 16x16 grayscale thumbnail and a 4x4x4 color histogram.
THUMBNAIL = 16
COLOR_BINS = 4


def conflicts(keys: Sequence[Hashable], labels: Sequence[str]) -> list[int]:
    """Indices of the records whose key (normalized text, image hash) appears under 2 or more distinct labels."""
    seen: dict[Hashable, set[str]] = defaultdict(set)
    for key, label in zip(keys, labels, strict=True):
        seen[key].add(label)
    return [i for i, key in enumerate(keys) if len(seen[key]) > 1]


def class_counts(labels: Sequence[str]) -> dict[str, int]:
    """Records per class, the largest class first (ties by label)."""
    return dict(sorted(Counter(labels).items(), key=lambda item: (-item[1], item[0])))


def rare_classes(counts: dict[str, int], ratio: float) -> list[str]:
    """Classes with fewer records than ratio times the mean records per class, the rarest first."""
    if not counts:
        return []
    limit = ratio * sum(counts.values()) / len(counts)
    return sorted((label for label, count in counts.items() if count < limit), key=lambda label: (counts[label], label))


def unseen_classes(train: dict[str, int], other: dict[str, int]) -> list[str]:
    """Classes with records in `other` (validation or test) but none in train, sorted."""
    return sorted(label for label, count in other.items() if count and not train.get(label))


# What each label check's refusal says of the records it found.
FOUND = {"conflicts": "records have a text also labelled otherwise", "label_errors": "records have a suspect label"}


def train_labels(keys: Sequence[Hashable], names: Sequence[str | None], lines: Sequence[int], kept: Sequence[int],
                 policy: QualitySpec, suspect: Callable[[list[int]], list[int]] | None = None,
                 ) -> tuple[dict, dict[str, list[int]]]:
    """The train split's `labels` section of the data report, and the records (indices) each check found.

    keys: each record's normalized text (or image reference); names: its label (None: unlabelled); kept: the records
    the other checks keep. Conflicts are looked for among every record (a repeat under another label is one, even
    where repeats are dropped); class counts and suspected errors among the kept ones. `suspect(indices)` returns
    the positions in `indices` whose label it suspects (None: the task has no model for it).
    """
    labelled = [i for i, name in enumerate(names) if name is not None]
    conflicted = [] if policy.conflicts == QualityAction.off else sorted(
        labelled[i] for i in conflicts([keys[i] for i in labelled], [names[i] for i in labelled]))
    judged = [i for i in kept if names[i] is not None]
    suspected = [] if suspect is None or policy.label_errors == QualityAction.off else sorted(
        judged[i] for i in suspect(judged))
    counts = class_counts([names[i] for i in judged])
    section = {"conflicts": len(conflicted), "conflictLines": [lines[i] for i in conflicted],
               "suspected": {"count": len(suspected), "lines": [lines[i] for i in suspected]},
               "classes": counts, "rare": rare_classes(counts, policy.rare_class_ratio)}
    return section, {"conflicts": conflicted, "label_errors": suspected}


def out_of_fold_probabilities(features, labels: Sequence[str], *,
                              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(indices judged, their class numbers, out-of-fold probabilities) of a logistic regression, or None.

    `features` is a matrix with one row per record. Records of single-record classes are left out; stratified folds,
    k = min(FOLDS, smallest class count). None when the model cannot judge (see the module's docstring).
    """
    counts = Counter(labels)
    kept = np.array([i for i, label in enumerate(labels) if counts[label] > 1], dtype=np.int64)
    if kept.size < MIN_RECORDS:
        return None
    _, classes = np.unique(np.asarray(labels, dtype=object)[kept].astype(str), return_inverse=True)
    sizes = np.bincount(classes)
    rows = features[kept]
    blank = rows.nnz == 0 if sparse.issparse(rows) else not np.any(rows)
    if sizes.size < 2 or blank:
        return None
    folds = StratifiedKFold(n_splits=min(FOLDS, int(sizes.min())), shuffle=True, random_state=seed)
    # One BLAS/OpenMP thread: the model is small, and on a shared CPU more threads made it 4-20x slower (measured).
    # A fit stopped at max_iter still ranks the records: its warning would only be noise in the validation log.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probabilities = cross_val_predict(_model(rows, seed), rows, classes, cv=folds, method="predict_proba")
    return kept, classes, probabilities


def _model(features, seed: int) -> LogisticRegression:
    if sparse.issparse(features):
        # TF-IDF rows (unit length): sag, 2-4x faster than lbfgs there with the same issues found.
        return LogisticRegression(solver="sag", tol=1e-3, max_iter=200, random_state=seed)
    # Dense standardized image features, where sag converges slowly; C=0.1 keeps the many pixel weights small.
    return LogisticRegression(C=0.1, tol=1e-3, max_iter=200)


def _suspected(features, labels: Sequence[str], seed: int) -> list[int]:
    judged = out_of_fold_probabilities(features, labels, seed=seed)
    if judged is None:
        return []
    kept, classes, probabilities = judged
    issues = find_label_issues(classes, probabilities, n_jobs=1)
    return sorted(int(i) for i in kept[issues])


def text_features(texts: Sequence[str]) -> sparse.csr_matrix | None:
    """TF-IDF of word unigrams and bigrams, or None when the texts give no feature (all empty).

    Word n-grams: the texts are normalized already (case, punctuation), where character n-grams would add little but
    several times the features and time; bigrams keep short phrases ("not good"). A term of a single record is left
    out (min_df=2): it cannot help predict any other record out of fold. At most the 50,000 most frequent terms, which
    keeps the model's fit time flat. Fitted on all texts without their labels (unsupervised, so no label leaks into
    the folds), once rather than per fold.
    """
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=50_000, dtype=np.float32)
    try:
        return vectorizer.fit_transform(texts)
    except ValueError:  # an empty vocabulary: no text has a word
        return None


def suspected_label_errors(texts: Sequence[str], labels: Sequence[str], *, seed: int = 0) -> list[int]:
    """Sorted indices of the records whose label confident learning suspects, from TF-IDF + logistic regression."""
    if len(texts) != len(labels) or len(set(texts)) < 2:
        return []
    features = text_features(texts)
    return [] if features is None else _suspected(features, labels, seed)


def _thumbnail(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    return np.asarray(rgb.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), dtype=np.float32)


def image_features(images: Sequence) -> tuple[np.ndarray, list[int]]:
    """Standardized thumbnail + color histogram per image (a PIL image or a file's path), and the indices of the
    images that gave one."""
    rows, indices = [], []
    for i, image in enumerate(images):
        try:
            if isinstance(image, str | PathLike):  # a file: opened one at a time
                with Image.open(image) as opened:
                    small = _thumbnail(opened)
            else:
                small = _thumbnail(image)
        except Exception:  # None, or a mode or file Pillow cannot convert: the image is left out
            continue
        gray = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        bins = (small // (256 // COLOR_BINS)).astype(np.int64).reshape(-1, 3)
        histogram = np.bincount(bins @ [COLOR_BINS * COLOR_BINS, COLOR_BINS, 1], minlength=COLOR_BINS**3)
        rows.append(np.concatenate([gray.ravel() / 255, histogram / len(bins)]))
        indices.append(i)
    if not rows:
        return np.empty((0, 0), dtype=np.float32), []
    return StandardScaler().fit_transform(np.array(rows, dtype=np.float32)), indices


def suspected_image_label_errors(images: Sequence, labels: Sequence[str], *, seed: int = 0) -> list[int]:
    """Sorted indices of the images whose label confident learning suspects, from a small frozen feature.

    The feature is each image's 16x16 grayscale thumbnail and a coarse color histogram (64 bins), standardized, under a
    logistic regression. It is not a semantic feature: it finds errors only where the classes differ in color,
    brightness or layout (defects on a plain background, scans versus photos), and suspects nothing useful where they
    differ in what the picture shows (cats versus dogs). Images that are None or cannot be converted are left out.
    """
    if len(images) != len(labels):
        return []
    features, indices = image_features(images)
    if len(indices) < MIN_RECORDS:
        return []
    suspected = _suspected(features, [labels[i] for i in indices], seed)
    return [indices[i] for i in suspected]
