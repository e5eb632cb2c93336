"""Record formats: detecting them, checking a record against its format, and the instruction template."""

from __future__ import annotations

from typing import Any

from ..errors import DatasetError
from ..spec import DataFormat

ROLES = ("system", "user", "assistant")
EXPECTED_KEYS = ("messages (chat), instruction + output (instruction), prompt + completion (completion), "
                 "text (text)")
CHAT_HINT = 'write messages as [{"role": "user", "content": "..."}, {"role": "assistant", ...}]'
REQUIRED = {
    DataFormat.chat: ("messages",),
    DataFormat.instruction: ("instruction", "output"),
    DataFormat.completion: ("prompt", "completion"),
    DataFormat.text: ("text",),
}

# The instruction prompt (Alpaca style). The "### Input" block is left out when input is missing or empty.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class RecordError(Exception):
    """A problem with one record; the caller adds the file and line (see DatasetError)."""

    def __init__(self, problem: str, hint: str = ""):
        super().__init__(problem)
        self.problem, self.hint = problem, hint


def detect_format(value: dict, file: str = "record", line: int = 0) -> DataFormat:
    """The format a record is in, from its keys. Raises DatasetError when no format matches."""
    try:
        return guess_format(value)
    except RecordError as e:
        raise DatasetError(file, line, e.problem, e.hint) from None


def guess_format(value: dict) -> DataFormat:
    if "messages" in value:
        return DataFormat.chat
    if "instruction" in value:
        return DataFormat.instruction
    if "prompt" in value and "completion" in value:
        return DataFormat.completion
    if "text" in value:
        return DataFormat.text
    keys = ", ".join(sorted(value)) or "none"
    raise RecordError(f"unrecognized record keys ({keys}); expected {EXPECTED_KEYS}",
                      "rename the fields to match one of these formats")


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
                          "use one format for every record, or fix dataset.format")
    if fmt == DataFormat.chat:
        check_messages(value["messages"])
    elif fmt == DataFormat.instruction:
        _text_field(value, "instruction")
        _text_field(value, "output")
        if value.get("input") is not None and not isinstance(value["input"], str):
            raise RecordError(f"field 'input' is {_kind(value['input'])}, expected a string",
                              "make input a string, or leave it out")
    elif fmt == DataFormat.completion:
        _text_field(value, "prompt")
        _text_field(value, "completion")
    else:
        _text_field(value, "text")


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty array", CHAT_HINT)
    previous = None
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise RecordError(f"message {n} is {_kind(message)}, expected an object", CHAT_HINT)
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"message {n} has role {role!r}; roles must be one of {', '.join(ROLES)}",
                              "map other roles (e.g. human/gpt) to user/assistant")
        if role == "system" and n != 1:
            raise RecordError(f"message {n} is a system message; only the first message may be system",
                              "move the system prompt to the start or merge it into a user turn")
        if role == "assistant" and previous in (None, "system"):
            raise RecordError(f"message {n} is an assistant turn before any user turn",
                              "start the conversation with a user message")
        if role != "system" and role == previous:
            raise RecordError(f"messages {n - 1} and {n} are both {role} turns; user and assistant alternate",
                              "merge consecutive turns of the same role")
        content = message.get("content")
        if not isinstance(content, str):
            raise RecordError(f"message {n} content is {_kind(content)}, expected a string",
                              "flatten structured content (e.g. a list of parts) into text")
        if not content.strip():
            raise RecordError(f"message {n} ({role}) has empty content", "remove the turn or fill it in")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message: nothing to train on",
                          "every conversation needs at least one assistant turn")


def instruction_prompt(value: dict) -> str:
    if value.get("input"):
        return INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction=value["instruction"], input=value["input"])
    return INSTRUCTION_TEMPLATE.format(instruction=value["instruction"])


def _text_field(value: dict, key: str) -> None:
    if not isinstance(value[key], str):
        raise RecordError(f"field {key!r} is {_kind(value[key])}, expected a string",
                          f"make {key} a non-empty string")
    if not value[key].strip():
        raise RecordError(f"field {key!r} is empty", "remove the record or fill the field in")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return kinds.get(type(value), "a number")
