"""`--log-format json`: one JSON object per line, for containers and log shippers.

Each line has `time` (ISO 8601, UTC), `level`, `namespace` and `message`
(the event formatted as the text log shows it), the traceback of a failure
as `traceback`, and the event's own simple fields (`tunnel`, `agent`,
`peer`...: STYLE.md's `{field}` keywords), so a shipper can filter on them.
Not twisted.logger's `jsonFileLogObserver`: that one prefixes each record
with RS (0x1e, RFC 7464) and writes the whole event, logger objects included.

Fields whose names smell of a secret are left out, whatever they hold: we
never log a token or reclaim secret (STYLE.md), and this keeps a mistake
from reaching the shipper too.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

from twisted.logger import FileLogObserver, formatEvent

LOG_FORMATS = ("text", "json")
_SECRET_WORDS = ("token", "secret", "password", "credential", "authorization")
_SIMPLE = (str, int, float, bool, type(None))


def json_line(event: dict) -> str:
    """One log event as one line of JSON (newline included)."""
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", str(level)),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot print itself still leaves a line
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in record or not isinstance(value, _SIMPLE):
            continue
        if any(word in key.lower() for word in _SECRET_WORDS):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = repr(value)  # NaN is not JSON (RFC 8259)
        record[key] = value
    # ensure_ascii: a lone surrogate from a peer cannot make the line unwritable.
    return json.dumps(record, ensure_ascii=True, default=repr) + "\n"


def json_file_observer(out) -> FileLogObserver:
    """A twisted.logger observer writing `json_line` of each event to `out`."""
    return FileLogObserver(out, json_line)
