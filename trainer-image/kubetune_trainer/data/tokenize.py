"""Turning one record into token ids and labels, with loss only on what the model should learn to write."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from kubetune_api import PREFERENCE_FORMATS, DataFormat

from ..errors import ConfigError
from .formats import RecordError, instruction_prompt, preference_pair, sharegpt_messages
from .formats import trained as is_trained

IGNORE = -100  # label of a token that gets no loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token id where it is trained, IGNORE elsewhere; not shifted (the model shifts)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    @classmethod
    def from_arrays(cls, ids, trained) -> Example:
        """From token ids and a loss mask (1 where trained) as arrays: how the pass and its cache keep them."""
        return cls(ids.tolist(), np.where(trained == 1, ids, IGNORE).tolist())


def tokenize_record(value: dict, fmt: DataFormat, tokenizer, max_seq_length: int) -> Example:
    """Tokenize a checked record of a concrete format, truncated to max_seq_length (keeping the start)."""
    return truncate(tokenize_full(value, fmt, tokenizer), max_seq_length)


def truncate(example: Example, max_seq_length: int) -> Example:
    return Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])


def tokenize_full(value: dict, fmt: DataFormat, tokenizer) -> Example:
    """Tokenize without truncation. Segments are (text, trained) pairs tokenized one by one, so the mask
    boundaries are exact; the first token never gets a loss since nothing comes before it to predict it.
    A ShareGPT record is tokenized as the chat record it maps to."""
    return tokenize_many([value], fmt, tokenizer)[0]


def tokenize_pair(value: dict, fmt: DataFormat, tokenizer, max_seq_length: int) -> tuple[Example, Example]:
    """The chosen and rejected sequences of a checked preference record, each truncated to max_seq_length."""
    chosen, rejected = tokenize_many([value], fmt, tokenizer)
    return truncate(chosen, max_seq_length), truncate(rejected, max_seq_length)


def tokenize_many(values: list[dict], fmt: DataFormat, tokenizer) -> list[Example]:
    """tokenize_full of many records, with one tokenizer call for all their segments (what makes a pass over
    millions of records fast); a preference record gives two examples, chosen then rejected. Raises RecordError
    for the first record a chat template rejects."""
    return assemble([s for value in values for s in record_sequences(value, fmt, tokenizer)], tokenizer)


Segments = list[tuple[str, bool]]  # (text, trained) pieces of one sequence, before special tokens


def assemble(sequences: list[tuple[Segments, bool]], tokenizer) -> list[Example]:
    """The examples of sequences given as (segments, plain): the segments are tokenized in one batch, then laid end
    to end; a plain (not chat-templated) sequence gets the tokenizer's leading special tokens and eos."""
    texts = [text for segments, _ in sequences for text, _ in segments if text]
    pieces = iter(encode_texts(tokenizer, texts))
    prefix = bos_prefix(tokenizer) if any(plain for _, plain in sequences) else []
    out = []
    for segments, plain in sequences:
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            if text:
                piece = next(pieces)
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
        if plain:
            ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
            if tokenizer.eos_token_id is not None:
                ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        if labels:
            labels[0] = IGNORE
        out.append(Example(ids, labels))
    return out


def record_sequences(value: dict, fmt: DataFormat, tokenizer) -> list[tuple[Segments, bool]]:
    """A checked record as the (segments, plain) of the sequences it becomes: one, or a preference pair's two."""
    if fmt in PREFERENCE_FORMATS:
        return pair_sequences(value, fmt, tokenizer)
    return [(record_segments(value, fmt, tokenizer), fmt not in (DataFormat.chat, DataFormat.sharegpt))]


def record_segments(value: dict, fmt: DataFormat, tokenizer) -> Segments:
    """A checked record of a supervised format as (text, trained) segments, before special tokens."""
    if fmt == DataFormat.chat:
        return chat_segments(value["messages"], tokenizer)
    if fmt == DataFormat.sharegpt:
        return chat_segments(sharegpt_messages(value["conversations"]), tokenizer)
    if fmt == DataFormat.instruction:
        return [(instruction_prompt(value), False), (value["output"], True)]
    if fmt == DataFormat.completion:
        return [(value["prompt"], False), (value["completion"], True)]
    return [(value["text"], True)]


def pair_sequences(value: dict, fmt: DataFormat, tokenizer) -> list[tuple[Segments, bool]]:
    """A checked preference record's chosen and rejected sequences: the shared prompt untrained, then the answer
    trained. Plain text as the completion format; chat messages rendered with the chat template, the prompt with
    its generation prompt, the answer up to its end-of-turn marker (earlier assistant turns are not trained)."""
    prompt, *answers = preference_pair(value, fmt)
    if isinstance(prompt, str):
        return [([(prompt, False), (answer, True)], True) for answer in answers]
    head = render(tokenizer, prompt, add_generation_prompt=True)
    return [(_answer_segments(head, prompt, answer, tokenizer), False) for answer in answers]


def _answer_segments(head: str, prompt: list[dict], answer: dict, tokenizer) -> Segments:
    full = render(tokenizer, prompt + [answer])
    turn = full.rstrip()
    if turn.startswith(head):
        return [(head, False), (turn[len(head):], True), (full[len(turn):], False)]
    segments = chat_segments(prompt + [answer], tokenizer)  # a template that renders the prompt otherwise once answered
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return [(text, i == last) for i, (text, _) in enumerate(segments)]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens: what tokenizer(text, add_special_tokens=False) gives, in
    one batch (a fast tokenizer's Rust backend directly, which skips transformers' per-call overhead)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@lru_cache(maxsize=16)
def bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. [bos] for Llama, [] for Qwen)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """What tokenizer.apply_chat_template(messages, tokenize=False) returns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat_template, so chat records cannot be rendered "
                          "(use a model with a chat template, or the instruction/completion format)")
    fast = _compiled_template(tokenizer)
    try:
        if fast is not None and _plain(messages):
            return fast(messages, add_generation_prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja2 raise_exception included)
        raise RecordError(f"the chat template rejected this conversation: {e}",
                          "check the roles and their order for this model") from None


def _plain(messages: list[dict]) -> bool:
    """Messages of string roles and contents only: apply_chat_template's normalization leaves them as they are."""
    return all(message.keys() <= {"role", "content"} and all(type(v) is str for v in message.values())
               for message in messages)


@lru_cache(maxsize=16)
def _compiled_template(tokenizer):
    """The tokenizer's chat template, compiled once, rendered with what apply_chat_template passes it (the special
    tokens, no tools, no documents). apply_chat_template itself spends most of its time normalizing messages,
    which plain ones do not need: rendering directly makes the pass about twice as fast. None when this
    transformers has no compiled-template cache (apply_chat_template is used then)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    compiled = _compile_jinja_template(tokenizer.get_chat_template())
    context = dict(tokenizer.special_tokens_map)

    def fast(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **context)

    return fast


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn is trained from the end
    of its generation prompt to its end-of-turn marker (what render(messages[:i+1]) adds after the prompt,
    less trailing whitespace). Templates that re-render earlier turns fall back to finding the content. An
    assistant turn with OpenAI's `"weight": 0` is rendered but not trained."""
    train = [is_trained(m) for m in messages]
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # the template never sees it
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if not train[i]:
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = (full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])).rstrip()
        if full.startswith(turn) and turn.startswith(prompt) and len(prompt) >= cursor:
            start, end = len(prompt), len(turn)
        else:
            start = full.find(message["content"], cursor)
            if start < 0:
                raise RecordError(f"message {i + 1}: the chat template output lacks the assistant text",
                                  "use the instruction or completion format with this model")
            end = start + len(message["content"])
            end += next((len(t) for t in _end_markers(tokenizer) if full.startswith(t, end)), 0)
        spans.append((start, end))
        cursor = end
    segments, cursor = [], 0
    for start, end in spans:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    return segments + [(full[cursor:], False)]


def _end_markers(tokenizer) -> list[str]:
    return sorted((t for t in tokenizer.all_special_tokens if t), key=len, reverse=True)
