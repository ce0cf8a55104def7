"""OpenAI-compatible embeddings client (DeepInfra by default).

- always sends `encoding_format: "float"` (DeepInfra answers 400 to the null the OpenAI SDK sends)
  and still reads base64 answers, which some providers return regardless;
- plans batches by count (EMBED_MAX_BATCH) and by an estimated token budget per request;
- splits a batch in half when the provider says it is too large, in any of the shapes real servers use
  (OpenAI/DeepInfra 400 "maximum context length", vLLM 400, infinity 422 with a pydantic `detail` list
  "too_long"/"string_too_long", llama.cpp 500 "too large to process", any 413), down to the one input
  it refuses; the halves embedded on the way are kept (`embed_partial` returns the refused inputs with
  the provider's reason; `embed` raises `InputTooLarge` for them);
- retries transient errors EMBED_PROVIDER_MAX_RETRIES times, honouring Retry-After;
- checks the dimension of what comes back against the target column.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import httpx

from fleet.shared.config import Settings, get_settings
from fleet.shared.errors import PermanentError, ProviderError, TransientError
from fleet.shared.health import check_available, note_failure, note_success
from fleet.shared.metrics import metrics
from fleet.shared.providers.http import bearer, call_with_retries, http_client, raise_for_provider, timed_post

PROVIDER = "embeddings"
TOO_LARGE_HINTS = (
    "too large",
    "too long",
    "too_long",
    "maximum context",
    "max tokens",
    "token limit",
    "exceeds",
    "at most",
    "physical batch size",
)
TOO_LARGE_STATUS = (400, 422, 500)  # with one of the hints; 413 always


def estimate_tokens(text: str) -> int:
    """About four bytes per token for BPE-style tokenizers; errs on the high side for non-ASCII text."""
    return max(1, (len(text.encode()) + 3) // 4)


def plan_batches(texts: Sequence[str], max_batch: int, max_tokens: int) -> list[list[int]]:
    """Indexes grouped into requests of at most max_batch inputs and max_tokens estimated tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, text in enumerate(texts):
        t = estimate_tokens(text)
        if current and (len(current) >= max_batch or tokens + t > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += t
    if current:
        batches.append(current)
    return batches


class DimensionMismatch(PermanentError):
    pass


class InputTooLarge(PermanentError):
    """The provider refuses this one input even alone."""


@dataclass
class EmbeddingResult:
    vectors: list[list[float]]  # one per input embedded, in input order (the rejected ones left out)
    tokens: int
    rejected: dict[int, str] = field(default_factory=dict)  # index of an input refused even alone -> the reason


class EmbeddingsClient:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        rate_limit: Callable[[], AbstractContextManager[object]] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.base_url = self.settings.embedding_api_base
        self.rate_limit = rate_limit  # a context-manager factory, acquired once per HTTP request

    @property
    def client(self) -> httpx.Client:
        return http_client(self.base_url, timeout_s=self.settings.embed_timeout_s)

    def embed(
        self, texts: Sequence[str], *, model: str | None = None, expected_dim: int | None = None
    ) -> EmbeddingResult:
        """Embed one planned batch, every input of it, or raise InputTooLarge for an input refused even alone."""
        result = self.embed_partial(texts, model=model, expected_dim=expected_dim)
        if result.rejected:
            raise InputTooLarge(next(iter(result.rejected.values())))
        return result

    def embed_partial(
        self, texts: Sequence[str], *, model: str | None = None, expected_dim: int | None = None
    ) -> EmbeddingResult:
        """Embed one planned batch, halving it while the provider says it is too large. The vectors of the
        halves it embeds are kept: the inputs it refuses even alone come back in `rejected`, so one
        oversized input costs about 2*log2(n) extra calls, never the rest of the batch."""
        check_available(PROVIDER, self.settings)
        return self._bisect(list(texts), 0, model or self.settings.embedding_model_default, expected_dim)

    def _bisect(self, texts: list[str], offset: int, model: str, expected_dim: int | None) -> EmbeddingResult:
        try:
            return self._embed_once(texts, model, expected_dim)
        except ProviderError as e:
            if not self._too_large(e):
                raise
            if len(texts) == 1:
                reason = (
                    f"the provider refuses this input even alone ({estimate_tokens(texts[0])} estimated tokens): {e}"
                )
                return EmbeddingResult([], 0, {offset: reason})
        half = len(texts) // 2
        left = self._bisect(texts[:half], offset, model, expected_dim)
        right = self._bisect(texts[half:], offset + half, model, expected_dim)
        return EmbeddingResult(left.vectors + right.vectors, left.tokens + right.tokens, left.rejected | right.rejected)

    @staticmethod
    def _too_large(e: ProviderError) -> bool:
        text = str(e).lower()
        return e.status == 413 or (e.status in TOO_LARGE_STATUS and any(h in text for h in TOO_LARGE_HINTS))

    def _embed_once(self, texts: list[str], model: str, expected_dim: int | None) -> EmbeddingResult:
        key = self.settings.embedding_api_key.get_secret_value() if self.settings.embedding_api_key else None
        body = {"model": model, "input": texts, "encoding_format": "float"}

        def request() -> EmbeddingResult:
            try:
                if self.rate_limit is not None:
                    with self.rate_limit():
                        response = self._post(body, key)
                else:
                    response = self._post(body, key)
                raise_for_provider(PROVIDER, response)
                result = self._parse(response, len(texts), expected_dim)
            except Exception as e:
                note_failure(PROVIDER, e, self.settings)  # each faulty attempt counts; never raises itself
                raise
            return result

        result = call_with_retries(request, provider=PROVIDER, max_retries=self.settings.embed_provider_max_retries)
        note_success(PROVIDER, self.settings)  # outside the retries: an answer already paid for is never re-sent
        return result

    def _post(self, body: dict, key: str | None) -> httpx.Response:
        return timed_post(self.client, PROVIDER, "/embeddings", body, bearer(key))

    @staticmethod
    def _parse(response: httpx.Response, n: int, expected_dim: int | None) -> EmbeddingResult:
        try:
            data = response.json()
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [_decode(item["embedding"]) for item in items]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # A cut or garbled body is the provider's transient fault: the call is retried.
            raise TransientError(f"{PROVIDER} sent a malformed answer ({type(e).__name__})") from None
        if len(vectors) != n:
            raise TransientError(f"{PROVIDER} answered {len(vectors)} embeddings for {n} inputs")
        if expected_dim is not None:
            wrong = {len(v) for v in vectors if len(v) != expected_dim}
            if wrong:
                raise DimensionMismatch(
                    f"the provider returned {sorted(wrong)[0]}-dimensional vectors but the target column is "
                    f"vector({expected_dim}): use a {expected_dim}-dimensional model (EMBEDDING_MODEL_DEFAULT) "
                    f"or migrate the column (see README: embedding dimension)"
                )
        usage = data.get("usage") or {}
        tokens = int(usage.get("total_tokens") or usage.get("prompt_tokens") or 0)
        metrics().provider_tokens.labels(PROVIDER, "input").inc(tokens)
        return EmbeddingResult(vectors, tokens)


def _decode(embedding) -> list[float]:
    if isinstance(embedding, str):  # base64 of little-endian float32
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if not isinstance(embedding, list):
        raise TypeError("embedding is neither a list nor base64")
    return [float(x) for x in embedding]
