"""Turning one record into token ids and labels, with loss only on what the model should learn to write."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..spec import DataFormat
from .formats import RecordError, instruction_prompt, sharegpt_messages

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


def tokenize_record(value: dict, fmt: DataFormat, tokenizer, max_seq_length: int) -> Example:
    """Tokenize a checked record of a concrete format, truncated to max_seq_length (keeping the start)."""
    return truncate(tokenize_full(value, fmt, tokenizer), max_seq_length)


def truncate(example: Example, max_seq_length: int) -> Example:
    return Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])


def tokenize_full(value: dict, fmt: DataFormat, tokenizer) -> Example:
    """Tokenize without truncation. Segments are (text, trained) pairs tokenized one by one, so the mask
    boundaries are exact; the first token never gets a loss since nothing comes before it to predict it.
    A ShareGPT record is tokenized as the chat record it maps to."""
    if fmt in (DataFormat.chat, DataFormat.sharegpt):
        messages = value["messages"] if fmt == DataFormat.chat else sharegpt_messages(value["conversations"])
        ids, labels = _encode(chat_segments(messages, tokenizer), tokenizer)
    else:
        if fmt == DataFormat.instruction:
            segments = [(instruction_prompt(value), False), (value["output"], True)]
        elif fmt == DataFormat.completion:
            segments = [(value["prompt"], False), (value["completion"], True)]
        else:
            segments = [(value["text"], True)]
        ids, labels = _encode(segments, tokenizer)
        prefix = bos_prefix(tokenizer)
        ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
        if tokenizer.eos_token_id is not None:
            ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if labels:
        labels[0] = IGNORE
    return Example(ids, labels)


def _encode(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return ids, labels


def bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. [bos] for Llama, [] for Qwen)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat_template, so chat records cannot be rendered "
                          "(use a model with a chat template, or the instruction/completion format)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - templates raise anything (jinja2 raise_exception included)
        raise RecordError(f"the chat template rejected this conversation: {e}",
                          "check the roles and their order for this model") from None


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn is trained from the end
    of its generation prompt to its end-of-turn marker (what render(messages[:i+1]) adds after the prompt,
    less trailing whitespace). Templates that re-render earlier turns fall back to finding the content."""
    full = render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render(tokenizer, messages[: i + 1]).rstrip()
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
