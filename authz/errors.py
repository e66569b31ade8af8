"""Why authz denies a request. Each denial carries its wire meaning.

    Denial                      (never raised for client input: returned as a Decision)
    ├── Unauthenticated  401    missing_credentials
    └── Forbidden        403    unknown_api

``code`` is stable snake_case, used in the JSON body, logs and metric labels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Denial:
    http_status: int
    code: str
    message: str


MISSING_CREDENTIALS = Denial(401, "missing_credentials", "this API requires credentials")
UNKNOWN_API = Denial(403, "unknown_api", "no authorization policy for this route")
