"""Record formats: detecting them, checking a record against its format, and the instruction template."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from kubetune_api import FORMAT_FIELDS, PREFERENCE_FORMATS, DataFormat

from ..errors import DatasetError

ROLES = ("system", "user", "assistant")
# ShareGPT's speakers ("from") as chat roles; "user" and "assistant" are written by some exporters too.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
EXPECTED_KEYS = ("messages (chat), conversations (sharegpt), instruction + output (instruction), prompt + completion "
                 "(completion), text (text), chosen + rejected (preference), preferred_output + non_preferred_output "
                 "(openai-preference)")
CHAT_HINT = 'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", ...}]'
SHAREGPT_HINT = 'write conversations as [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]'
REQUIRED = {
    DataFormat.chat: ("messages",),
    DataFormat.sharegpt: ("conversations",),
    DataFormat.instruction: ("instruction", "output"),
    DataFormat.completion: ("prompt", "completion"),
    DataFormat.text: ("text",),
    DataFormat.preference: ("chosen", "rejected"),
    DataFormat.openai_preference: ("input", "preferred_output", "non_preferred_output"),
}

# The instruction prompt (Alpaca style). The "### Input" block is left out when input is missing or empty.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass(frozen=True)
class _Words:
    """How a conversation format names its parts, so that errors use the words of the data."""

    field: str  # the record key holding the turns
    turn: str  # what one entry is called
    content: str  # the key of an entry's text
    roles: dict[str, str]  # chat role -> the name the format gives it
    hint: str


CHAT_WORDS = _Words("messages", "message", "content", {r: r for r in ROLES}, CHAT_HINT)
SHAREGPT_WORDS = _Words("conversations", "turn", "value", {"system": "system", "user": "human", "assistant": "gpt"},
                        SHAREGPT_HINT)


class RecordError(Exception):
    """A problem with one record; the caller adds the file and line (see DatasetError)."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


Fields = Mapping[str, str]  # dataset.fields: {format field: the records' column}


def with_fields(value: Any, fields: Fields | None) -> Any:
    """The record with its columns renamed to the format's fields (dataset.fields): {"response": r} with
    {"output": "response"} is {"output": r}. A record without the column is left as it is."""
    if not fields or not isinstance(value, dict):
        return value
    value = dict(value)
    for field, column in fields.items():
        if column in value:
            value[field] = value.pop(column)
    return value


def mapping_hint(value: dict, fmt: DataFormat, missing: str) -> str:
    """How to read a record whose columns have other names: map one of its other keys with dataset.fields."""
    others = sorted(k for k in value if k not in FORMAT_FIELDS.get(fmt, ()))
    if not others:
        return "use one format for every record, or fix dataset.format"
    return (f"the record's other keys are {', '.join(others)}: if one holds {missing}, map it with dataset.fields "
            f"(e.g. fields: {{{missing}: {others[-1]}}}), or fix dataset.format")


def detect_format(value: dict, file: str = "record", line: int = 0) -> DataFormat:
    """The format a record is in, from its keys. Raises DatasetError when no format matches."""
    try:
        return guess_format(value)
    except RecordError as e:
        raise DatasetError(file, line, e.problem, e.hint) from None


def guess_format(value: dict) -> DataFormat:
    if "preferred_output" in value or "non_preferred_output" in value:
        return DataFormat.openai_preference
    if "chosen" in value or "rejected" in value:
        return DataFormat.preference
    if "messages" in value:
        return DataFormat.chat
    if "conversations" in value:
        return DataFormat.sharegpt
    if "instruction" in value:
        return DataFormat.instruction
    if "prompt" in value and "completion" in value:
        return DataFormat.completion
    if "text" in value:
        return DataFormat.text
    keys = ", ".join(sorted(value)) or "none"
    raise RecordError(f"unrecognized record keys ({keys}); expected {EXPECTED_KEYS}",
                      "map your keys onto a format's fields with dataset.fields (e.g. fields: {output: response}), "
                      "or rename them")


def check_record(value: dict, fmt: DataFormat) -> None:
    """Raise RecordError when the record does not follow its (concrete) format."""
    missing = [key for key in REQUIRED[fmt] if key not in value]
    if missing:
        looks = ""
        try:
            other = guess_format(value)
            looks = f"; the record looks like {other.value}" if other != fmt else ""
        except RecordError:
            pass
        fields = ", ".join(map(repr, missing))
        raise RecordError(f"missing field {fields} required by format {fmt.value}{looks}",
                          mapping_hint(value, fmt, missing[0]))
    if fmt == DataFormat.chat:
        check_messages(value["messages"])
    elif fmt == DataFormat.sharegpt:
        check_messages(sharegpt_messages(value["conversations"]), SHAREGPT_WORDS)
    elif fmt == DataFormat.instruction:
        _text_field(value, "instruction")
        _text_field(value, "output")
        if value.get("input") is not None and not isinstance(value["input"], str):
            raise RecordError(f"field 'input' is {kind_of(value['input'])}, expected a string",
                              "make input a string, or leave it out")
    elif fmt == DataFormat.completion:
        _text_field(value, "prompt")
        _text_field(value, "completion")
    elif fmt in PREFERENCE_FORMATS:
        preference_pair(value, fmt)
    else:
        _text_field(value, "text")


def check_messages(messages: Any, words: _Words = CHAT_WORDS, answered: bool = True) -> None:
    """Check a chat conversation: roles, their order, non-empty text and (answered) an assistant turn. `words` names
    the parts in errors (a ShareGPT conversation is checked as the chat messages it maps to, see
    sharegpt_messages)."""
    w = words
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{w.field!r} must be a non-empty array", w.hint)
    previous = None
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise RecordError(f"{w.turn} {n} is {kind_of(message)}, expected an object", w.hint)
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"message {n} has role {role!r}; roles must be one of {', '.join(ROLES)}",
                              "map other roles (e.g. human/gpt) to user/assistant")
        name = w.roles[role]
        if role == "system" and n != 1:
            raise RecordError(f"{w.turn} {n} is a system {w.turn}; only the first {w.turn} may be system",
                              "move the system prompt to the start or merge it into a user turn")
        if role == "assistant" and previous in (None, "system"):
            raise RecordError(f"{w.turn} {n} ({name}) comes before any {w.roles['user']} turn",
                              f"start the conversation with a {w.roles['user']} {w.turn}")
        if role != "system" and role == previous:
            raise RecordError(f"{w.turn}s {n - 1} and {n} are both {name} turns; {w.roles['user']} and "
                              f"{w.roles['assistant']} turns alternate", "merge consecutive turns of the same role")
        content = message.get("content")
        if not isinstance(content, str):
            raise RecordError(f"{w.turn} {n} {w.content} is {kind_of(content)}, expected a string",
                              "flatten structured content (e.g. a list of parts) into text")
        if not content.strip():
            raise RecordError(f"{w.turn} {n} ({name}) has empty {w.content}", "remove the turn or fill it in")
        if "weight" in message:
            _check_weight(message, n, name, w)
        previous = role
    if answered and not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"no {w.roles['assistant']} {w.turn}: nothing to train on",
                          f"every conversation needs at least one {w.roles['assistant']} turn")
    if answered and not any(trained(m) for m in messages):
        raise RecordError(f"every {w.roles['assistant']} {w.turn} has weight 0: nothing to train on",
                          "give at least one answer weight 1 (or no weight), or leave the conversation out")


def trained(message: dict) -> bool:
    """Whether a checked message is trained: an assistant turn without OpenAI's `"weight": 0`."""
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def _check_weight(message: dict, n: int, name: str, w: _Words) -> None:
    """OpenAI's chat format: `"weight": 0` on an assistant turn leaves it out of training, 1 (the default) trains
    it; nothing else is meant."""
    weight = message["weight"]
    if message["role"] != "assistant":
        raise RecordError(f"{w.turn} {n} ({name}) has a weight; only {w.roles['assistant']} turns take one",
                          "remove the weight: only answers are trained")
    if type(weight) not in (int, float) or weight not in (0, 1):
        raise RecordError(f"{w.turn} {n} ({name}) has weight {weight!r}; a weight is 0 (do not train this turn) "
                          "or 1 (train it)", "set it to 0 or 1, or remove it (1)")


def sharegpt_messages(conversations: Any) -> list[dict]:
    """A ShareGPT conversation as chat messages ({"from": "human", "value": v} -> {"role": "user", "content": v}),
    so that it is checked, rendered and masked exactly like the equivalent chat record. Raises RecordError for
    a turn that is not an object or has an unknown "from"; check_messages(..., SHAREGPT_WORDS) checks the rest."""
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("'conversations' must be a non-empty array", SHAREGPT_HINT)
    messages = []
    for n, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {n} is {kind_of(turn)}, expected an object", SHAREGPT_HINT)
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            raise RecordError(f"turn {n} has from {speaker!r}; from must be one of {', '.join(SHAREGPT_ROLES)}",
                              "map other speakers to human (the user) or gpt (the model)")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def instruction_prompt(value: dict) -> str:
    if value.get("input"):
        return INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction=value["instruction"], input=value["input"])
    return INSTRUCTION_TEMPLATE.format(instruction=value["instruction"])


def _text_field(value: dict, key: str) -> None:
    if not isinstance(value[key], str):
        raise RecordError(f"field {key!r} is {kind_of(value[key])}, expected a string",
                          f"make {key} a non-empty string")
    if not value[key].strip():
        raise RecordError(f"field {key!r} is empty", "remove the record or fill the field in")


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), "a number")


PREFERENCE_HINT = ('write a pair as {"prompt": ..., "chosen": ..., "rejected": ...} with strings, or with chat '
                   'messages: the prompt a conversation ending with a user turn, each answer one assistant message')
SAME_KIND_HINT = "the prompt and both answers are all strings or all chat messages"


class Pair(NamedTuple):
    """A preference record's parts, all strings (plain text) or all chat messages: the prompt a conversation ending
    with a user turn, each answer one assistant message."""

    prompt: str | list[dict]
    chosen: str | dict
    rejected: str | dict


def preference_pair(value: dict, fmt: DataFormat) -> Pair:
    """The checked parts of a preference or openai-preference record whose required fields are present. Raises
    RecordError, naming the record's own fields."""
    if fmt == DataFormat.openai_preference:
        inputs = value["input"]
        if not isinstance(inputs, dict) or "messages" not in inputs:
            raise RecordError(f"field 'input' is {kind_of(inputs)} without 'messages', expected "
                              '{"messages": [...]}', "put the conversation so far in input.messages")
        names = ("input.messages", "preferred_output", "non_preferred_output")
        prompt, chosen, rejected = inputs["messages"], value["preferred_output"], value["non_preferred_output"]
    elif value.get("prompt") is None or (isinstance(value["prompt"], str) and _conversational(value["chosen"])
                                         and _conversational(value["rejected"])):
        # TRL's maybe_extract_prompt: no prompt, or UltraFeedback's string prompt beside whole conversations (which
        # repeat it): the prompt is what chosen and rejected share
        return _implicit_pair(value["chosen"], value["rejected"])
    else:
        names = ("prompt", "chosen", "rejected")
        prompt, chosen, rejected = value["prompt"], value["chosen"], value["rejected"]
    if fmt == DataFormat.preference and isinstance(prompt, str):
        for name in names:
            if isinstance(value[name], list | dict):
                raise RecordError(f"field 'prompt' is a string but {name!r} is {kind_of(value[name])}",
                                  SAME_KIND_HINT)
            _text_field(value, name)
        pair = Pair(prompt, chosen, rejected)
    else:
        _prompt_messages(prompt, names[0])
        pair = Pair(prompt, _answer(chosen, repr(names[1]), names[0]), _answer(rejected, repr(names[2]), names[0]))
    _different(pair, names[1], names[2])
    return pair


def _conversational(value: Any) -> bool:
    """TRL's is_conversational: an array of messages (objects with a role)."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _implicit_pair(chosen: Any, rejected: Any) -> Pair:
    """TRL's implicit prompt (extract_prompt): chosen and rejected are whole conversations that share every message
    but the last, or whole texts (HH-RLHF's "\n\nHuman: ...\n\nAssistant: ...") that share the prompt."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _text_pair(chosen, rejected)
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(conversation, str):
            raise RecordError(f"field {name!r} is a string but the other answer is not, and the record has no "
                              "'prompt'", "add the prompt, or write chosen and rejected as whole conversations")
        if not isinstance(conversation, list):
            raise RecordError(f"field {name!r} is {kind_of(conversation)}, expected an array of messages",
                              PREFERENCE_HINT)
        if len(conversation) < 2:
            raise RecordError(f"field {name!r} has {len(conversation)} message(s); without a 'prompt' it must be "
                              "the whole conversation: the prompt's messages, then the answer", PREFERENCE_HINT)
    if len(chosen) != len(rejected):
        raise RecordError(f"'chosen' has {len(chosen)} messages and 'rejected' {len(rejected)}; without a 'prompt' "
                          "they must share every message but the last (the answer)",
                          "give the shared turns as prompt and only the answers as chosen and rejected")
    differ = next((n for n, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True), start=1) if a != b), None)
    if differ:
        raise RecordError(f"'chosen' and 'rejected' differ at message {differ}; without a 'prompt' they must share "
                          "every message but the last (the answer)",
                          "give the shared turns as prompt and only the answers as chosen and rejected")
    pair = Pair(chosen[:-1], _answer(chosen[-1], "the last message of 'chosen'", "chosen"),
                _answer(rejected[-1], "the last message of 'rejected'", "chosen"))
    _prompt_messages(pair.prompt, "chosen")
    _different(pair, "chosen", "rejected")
    return pair


def _text_pair(chosen: str, rejected: str) -> Pair:
    """Two whole texts without a prompt, split as TRL's extract_prompt splits them: the prompt is their common
    start, less a space right before where they differ (the answers keep it)."""
    if not chosen.strip() or not rejected.strip():
        raise RecordError(f"field {'chosen' if not chosen.strip() else 'rejected'!r} is empty",
                          "remove the record or fill the answer in")
    end = len(os.path.commonprefix([chosen, rejected]))
    if end == min(len(chosen), len(rejected)):
        raise RecordError("'chosen' and 'rejected' are the same text, or one is the start of the other, and the "
                          "record has no 'prompt': the answers cannot be told from the prompt",
                          "add the prompt, and give only the answers as chosen and rejected")
    if end and chosen[end - 1] == " ":
        end -= 1
    if not chosen[:end].strip():
        raise RecordError("'chosen' and 'rejected' share no prompt (they differ from the start), and the record "
                          "has no 'prompt'", "add the prompt, or write both as the whole dialogue, prompt first")
    pair = Pair(chosen[:end], chosen[end:], rejected[end:])
    _different(pair, "chosen", "rejected")
    return pair


def _prompt_messages(prompt: Any, name: str) -> None:
    """Check the conversation before the answers: the chat rules, ending with a user turn."""
    try:
        check_messages(prompt, replace(CHAT_WORDS, field=name), answered=False)
    except RecordError as e:
        problem = e.problem if e.problem.startswith(repr(name)) else f"{name}: {e.problem}"
        raise RecordError(problem, e.hint) from None
    if prompt[-1]["role"] != "user":
        raise RecordError(f"{name}: message {len(prompt)} ({prompt[-1]['role']}) is the last before the answer; "
                          "it must be a user turn", "end the prompt with the user's message")


def _answer(answer: Any, what: str, prompt_name: str) -> dict:
    """One assistant message (or an array of one), checked. `what` names it in errors."""
    if isinstance(answer, list):
        if len(answer) != 1:
            raise RecordError(f"{what} has {len(answer)} messages, expected one assistant message (the answer)",
                              "put earlier turns in the prompt")
        answer = answer[0]
    if isinstance(answer, str):
        raise RecordError(f"{what} is a string but {prompt_name!r} holds chat messages", SAME_KIND_HINT)
    if not isinstance(answer, dict):
        raise RecordError(f"{what} is {kind_of(answer)}, expected an assistant message", PREFERENCE_HINT)
    if answer.get("role") != "assistant":
        raise RecordError(f"{what} has role {answer.get('role')!r}, expected assistant",
                          "the answers are the assistant's")
    content = answer.get("content")
    if not isinstance(content, str):
        raise RecordError(f"{what} content is {kind_of(content)}, expected a string",
                          "flatten structured content (e.g. a list of parts) into text")
    if not content.strip():
        raise RecordError(f"{what} has empty content", "remove the record or fill the answer in")
    return answer


def _different(pair: Pair, chosen: str, rejected: str) -> None:
    texts = [a if isinstance(a, str) else a["content"] for a in (pair.chosen, pair.rejected)]
    if texts[0].strip() == texts[1].strip():
        raise RecordError(f"{chosen!r} and {rejected!r} are the same answer",
                          "a pair needs two different answers: fix or remove the record")
