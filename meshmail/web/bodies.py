"""What the routes share: reading a request's JSON body and names in URLs.

Every failure is a werkzeug HTTPException (400, or 413 for a body over MAX_BODY) whose
description is the one line the client gets.
"""

from __future__ import annotations

import json
from typing import Any

from quart import request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from ..state.names import InvalidName, normalize_domain

#: Largest request body accepted; admin calls are small JSON documents.
MAX_BODY = 64 * 1024


def domain_name(text: str) -> str:
    """The normal form of a domain name from a URL; raises BadRequest with the reason."""
    try:
        return normalize_domain(text)
    except InvalidName as exc:
        raise BadRequest(str(exc)) from None


async def json_object(*, empty_ok: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; raises RequestEntityTooLarge (413) past MAX_BODY
    and BadRequest (400) for anything else."""
    try:
        body = await request.get_data(as_text=False)
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(f"request body larger than {MAX_BODY} bytes") from None
    if not body.strip() and empty_ok:
        return {}
    try:
        document = json.loads(body)
        # Strings with lone surrogates ("\ud800") are valid JSON but not Unicode text.
        json.dumps(document, ensure_ascii=False).encode()
    except (UnicodeError, ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON (nor UTF-8 text)") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document
