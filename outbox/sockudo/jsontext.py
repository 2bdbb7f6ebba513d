"""The one JSON serializer for everything that goes on the wire or into a row.

Compact separators, UTF-8 as is (no ``\\u`` escapes), and no NaN or Infinity (not JSON): the same
value always gives the same text, so a stored body is sent byte for byte on every attempt.
"""

from __future__ import annotations

import json
from typing import Any

#: One encoder for every call: ``json.dumps`` with options builds a new one each time, which
#: was a third of the cost of encoding a small event.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def compact_json(value: Any) -> str:
    """``value`` as compact JSON text; ``TypeError``/``ValueError`` when it is not JSON."""
    return _ENCODER.encode(value)
