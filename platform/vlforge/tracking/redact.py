"""Secrets never reach MLflow: masking of config keys, secret environment values and URL passwords.

Config keys whose name says secret, password, token, access key, API/private key or credential
are masked (``REDACTED``), values of such environment variables (``AWS_SECRET_ACCESS_KEY``,
``MLFLOW_TRACKING_PASSWORD``, ...) are replaced by ``***`` wherever they appear, and passwords
inside URLs (``https://user:pw@host``) are masked, in params, tags and artifacts alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "<redacted>"

_SECRET_NAME = re.compile(
    r"secret|passw(?:or)?d|credential|access_?key|api_?key|private_?key|(?:^|_)(?:session_)?token(?:$|_)"
)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@")
_NOT_SECRET_VALUES = {"true", "false", "none", "null", "yes", "no", "on", "off", "enabled", "disabled"}


def _snake(name: str) -> str:
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return re.sub(r"[\s\-]+", "_", name).lower()


def is_secret_name(key: str) -> bool:
    """True when any part of a dotted/slashed key names a secret (``storage.secret_key``,
    ``hfToken``, ``AWS_SECRET_ACCESS_KEY``); ``tokenizer.max_length`` is not one."""
    return any(_SECRET_NAME.search(_snake(part)) for part in re.split(r"[./]", str(key)))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names say they hold secrets, longest first."""
    environ = os.environ if environ is None else environ
    values = {
        v
        for k, v in environ.items()
        if is_secret_name(k) and len(v) >= 6 and v.lower() not in _NOT_SECRET_VALUES and not v.isdigit()
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with URL passwords and any of ``secrets`` replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def redact(obj: Any, secrets: Sequence[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret-named keys masked and secret values replaced."""
    secrets = secret_env_values() if secrets is None else secrets

    def walk(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {
                k: (REDACTED if is_secret_name(str(k)) and x not in (None, "", {}, []) else walk(x))
                for k, x in v.items()
            }
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        if isinstance(v, str):
            return redact_text(v, secrets)
        return v

    return walk(obj)
