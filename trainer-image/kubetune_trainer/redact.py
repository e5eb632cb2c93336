"""Redaction: no credential or presigned URL in what the trainer prints, logs or leaves as its termination message.

Pod logs, Events and the FineTuneJob's status are readable by people who may not read the credentials Secret, and
an error message can quote anything: a URL with its signature, an environment dump, a key in a traceback. So
`redact(text)` runs where text leaves the trainer (cli.fail and termination_log, the JSON event lines, the
tracebacks of uncaught exceptions) and removes:

* the values of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, MLFLOW_TRACKING_TOKEN and
  MLFLOW_TRACKING_PASSWORD from the environment, and the keys
  of the boto3 credentials the trainer's clients use (`watch`: a web identity's temporary keys are in no
  environment variable), as written, URL-encoded or JSON-escaped;
* the signing parameters of presigned URLs and Authorization headers (X-Amz-Signature, X-Amz-Credential,
  X-Amz-Security-Token, Signature, Credential, AWSAccessKeyId, GCS's X-Goog-*, Azure's sig), AWS access key ids
  (AKIA.../ASIA...), the password of a user:password@ URL, a Bearer or Basic Authorization value, and the value
  after a credential variable's name.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import traceback
from urllib.parse import quote

MASK = "***"
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                  "MLFLOW_TRACKING_PASSWORD")
MIN_SECRET_LENGTH = 4  # shorter values are placeholders; replacing them would garble every message

_END = r"[^&\s\"'<>\\,;)}\]]+"  # a parameter's value ends at the next parameter, quote, separator or space
_PATTERNS = [
    re.compile(r"((?<![\w-])(?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)"
               r"|Signature|Credential|AWSAccessKeyId|sig)(?:=|%3D))" + _END, re.I),
    re.compile(r"((?<![\w-])x-amz-security-token[\"']?\s*:\s*[\"']?)" + _END, re.I),  # a header
    re.compile(r"((?<![\w-])(?:AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|aws_secret_access_key|aws_session_token"
               r"|MLFLOW_TRACKING_TOKEN|MLFLOW_TRACKING_PASSWORD)[\"']?\s*[:=]\s*[\"']?)" + _END),
    re.compile(r"((?<![\w-])(?:Bearer|Basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),  # an Authorization header's value
    re.compile(r"()\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(r"(://[^/@\s:]+:)[^/@\s]+(?=@)"),  # scheme://user:password@host
]

_watched: list = []
_lock = threading.Lock()


def watch(credentials) -> None:
    """Redact these botocore credentials' keys too (call it with `session.get_credentials()` once a client is
    made). Refreshed keys are read when redacting, so a web identity's new temporary keys are covered."""
    if credentials is not None:
        with _lock:
            if all(c is not credentials for c in _watched):
                _watched.append(credentials)


def secrets() -> list[str]:
    """Every credential value to remove, longest first (a key that contains another is removed whole)."""
    values = [os.environ.get(name) for name in CREDENTIAL_ENV]
    with _lock:
        for creds in _watched:
            # The instance's attributes, not the properties: reading RefreshableCredentials.secret_key may
            # refresh the keys (a network call) in the middle of an error path.
            attrs = vars(creds)
            values += [attrs.get(key) for key in ("access_key", "secret_key", "token",
                                                  "_access_key", "_secret_key", "_token")]
    found = {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH}
    variants = found | {quote(v, safe="") for v in found} | {json.dumps(v)[1:-1] for v in found}
    return sorted(variants, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with the credentials and presigned-URL signatures replaced by ***."""
    for value in secrets():
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def _excepthook(exc_type, exc, tb) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "a thread"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in {name}:\n{text}"))


def install() -> None:
    """Uncaught exceptions (of the main thread and of any other) print redacted tracebacks."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
