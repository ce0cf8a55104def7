"""Refuses a request body over GATEWAY_MAX_BODY_BYTES with a 413 before anything reads it
(declared by Content-Length, or counted as a chunked body arrives), whatever the method: a GET's
body is bounded as a POST's is, and the limit applies before any credential is checked."""

from __future__ import annotations

from fleet.gateway.errors import error_response


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = error_response(
            413, "body_too_large", f"the body exceeds {self.max_bytes} bytes (GATEWAY_MAX_BODY_BYTES)"
        )
        await response(scope, receive, send)
