"""A client for OpenAI-compatible chat endpoints (vLLM, SGLang, hosted APIs) over the `openai` SDK.

Shared by the distillation teacher and the evaluation judge. The SDK (`openai.AsyncOpenAI`) does the
HTTP: retries with exponential backoff and jitter on 408/409/429/5xx, timeouts and dropped
connections, honours `Retry-After`, and raises typed errors. What is the project's own:

- many conversations go out concurrently (at most `concurrency` in flight) and each comes back as a
  `ChatReply`, failures included, so one bad request never loses the others;
- a wrong key, URL or model name (HTTP 401/403/404) raises `EndpointError` at once: every further
  request would fail the same way;
- a request the endpoint failed after the retries (5xx, 429, timeout, connection error, malformed
  body) is marked `endpoint_failed` and counted; past `max_failed_requests` of them the run stops with
  `EndpointFailures`, and a step that ends with any raises it too (`raise_if_failed`): an outage is
  never a result, and a rerun asks exactly the failed requests again;
- the API key goes into the Authorization header and nowhere else: not into logs, error messages,
  `repr` or files, and any echo of it in a server's error text is masked;
- reasoning is read from `reasoning_content` (older vLLM, SGLang, DeepSeek) and `reasoning` (vLLM >= 0.10).

    client = ChatClient("http://qwq:8000/v1", "Qwen/QwQ-32B", api_key=None, concurrency=16)
    client.probe()  # one cheap GET /models: a dead endpoint or a wrong key stops here, before any work
    replies = client.chat_many([[{"role": "user", "content": "..."}]], temperature=0.7, max_tokens=4096)
    replies[0].content, replies[0].reasoning_content, replies[0].completion_tokens, replies[0].error
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import openai
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# Never worth another try: the whole run would fail the same way.
FATAL_STATUSES = {
    401: "the API key was refused",
    403: "the API key may not use this model",
    404: "no such endpoint or model (base_url usually ends in /v1; check the model name)",
}
# Statuses the SDK retries: when they remain after the retries, the endpoint failed, not the request.
_ENDPOINT_STATUSES = frozenset({408, 409, 429})


class EndpointError(RuntimeError):
    """The endpoint refuses every request or cannot be reached: stop, fix the setting, rerun."""


class EndpointFailures(EndpointError):
    """Requests failed for reasons of the endpoint after the retries; a rerun asks exactly those again."""


@dataclass(frozen=True)
class ChatReply:
    content: str = ""
    # Reasoning that servers with a reasoning parser return beside the content (vLLM, SGLang, DeepSeek).
    reasoning_content: str = ""
    finish_reason: str | None = None  # "stop", "length" (hit max_tokens), ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0  # HTTP requests made, retries included
    latency_s: float = 0.0
    error: str | None = None  # why no usable reply came back; None on success
    # The endpoint failed (5xx, 429, timeout, connection, malformed body), not the request: never an
    # answer, never an attempt; a rerun asks again. False for a refused request (e.g. 400 too long).
    endpoint_failed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def safe_url(url: str) -> str:
    """The URL without any user:password it may carry, for messages and metadata."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class ChatClient:
    """Concurrent chat completions against one model on one OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 6,
        max_failed_requests: int = 10,
        extra_body: dict[str, Any] | None = None,
        key_source: str = "the api_key argument",
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_failed_requests = max_failed_requests
        self.extra_body = dict(extra_body or {})  # e.g. {"chat_template_kwargs": {...}}, sent with every request
        self.failures: Counter[str] = Counter()  # endpoint failures so far, by kind ("HTTP 503", "timed out", ...)
        self._api_key = api_key or ""
        self._key_source = key_source  # named in the 401 message, so the user knows what to fix

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.endpoint!r}, model={self.model!r}, concurrency={self.concurrency})"

    @property
    def endpoint(self) -> str:
        return safe_url(self.base_url)

    @classmethod
    def from_section(cls, section, env_prefix: str, **kwargs) -> "ChatClient":
        """Build from a recipe section: base_url, model, api_key_env and any of concurrency, timeout_s,
        max_retries, max_failed_requests, extra_body (`kwargs` override them).

        base_url and model fall back to ``<env_prefix>_BASE_URL`` / ``<env_prefix>_MODEL``; the key is
        read from the variable the section names (no key is fine for a local vLLM server).
        """
        base_url = section.base_url or os.environ.get(f"{env_prefix}_BASE_URL")
        model = section.model or os.environ.get(f"{env_prefix}_MODEL")
        for value, key, env in ((base_url, "base_url", "BASE_URL"), (model, "model", "MODEL")):
            if not value:
                raise ValueError(
                    f"no endpoint {key}: set it in the recipe or the environment variable {env_prefix}_{env}"
                )
        settings = {
            name: getattr(section, name)
            for name in ("concurrency", "timeout_s", "max_retries", "max_failed_requests", "extra_body")
            if hasattr(section, name)
        }
        settings["key_source"] = f"the environment variable {section.api_key_env}"
        return cls(base_url, model, os.environ.get(section.api_key_env), **(settings | kwargs))

    def _sdk(self) -> openai.AsyncOpenAI:
        # Without a key no Authorization header goes out (a local vLLM needs none), and the SDK never
        # falls back to OPENAI_API_KEY: someone's OpenAI key must not travel to a self-hosted teacher.
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key or "no-key", timeout=self.timeout_s, max_retries=self.max_retries
        )

    @property
    def _headers(self) -> dict:
        return {} if self._api_key else {"Authorization": openai.Omit()}  # see _sdk

    # -- public API -------------------------------------------------------------------------------

    def probe(self) -> list[str]:
        """One cheap request (GET /models) before the first batch; the served model names.

        Raises `EndpointError` when the endpoint cannot be reached or refuses the key, so a step stops
        before any work. A server without /models (404) is let through: the first request will tell.
        """

        async def list_models() -> list[str]:
            async with self._sdk() as sdk:
                return [m.id async for m in sdk.models.list(extra_headers=self._headers)]

        try:
            models = asyncio.run(list_models())
        except openai.NotFoundError:
            log.debug("%s has no /models; skipping the model check", self.endpoint)
            return []
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUSES:
                raise self._fatal(e) from None
            raise EndpointError(f"{self.endpoint} is not answering: {self._describe(e)[0]}. Start or fix the "
                                "endpoint, then rerun") from None
        except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError) as e:
            raise EndpointError(f"{self.endpoint} cannot be reached: {self._describe(e)[0]}. Start the server or "
                                "fix base_url, then rerun") from None
        if models and self.model not in models:
            log.warning("%s does not list the model %r (it serves %s)", self.endpoint, self.model, ", ".join(models[:10]))
        return models

    def chat(self, messages: Messages, **params) -> ChatReply:
        """One conversation; see `chat_many`."""
        return self.chat_many([messages], desc="", **params)[0]

    def chat_many(
        self,
        conversations: Sequence[Messages],
        *,
        on_reply: Callable[[int, ChatReply], None] | None = None,
        desc: str = "chat",
        **params,
    ) -> list[ChatReply]:
        """Replies in the order of `conversations`; `on_reply(index, reply)` runs as each one arrives.

        `params` go into every request body (temperature, top_p, max_tokens, seed, stop, logit_bias,
        ...; None values are left out). An exception raised by `on_reply` cancels the requests in
        flight and propagates, as do `EndpointError` and `EndpointFailures`.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.achat_many(conversations, on_reply=on_reply, desc=desc, **params))
        raise RuntimeError("chat_many was called inside a running event loop; await achat_many instead")

    async def achat_many(
        self,
        conversations: Sequence[Messages],
        *,
        on_reply: Callable[[int, ChatReply], None] | None = None,
        desc: str = "chat",
        **params,
    ) -> list[ChatReply]:
        """The async form of `chat_many`."""
        if not conversations:
            return []
        replies: list[ChatReply | None] = [None] * len(conversations)
        body = self.extra_body | {k: v for k, v in params.items() if v is not None}
        limit = asyncio.Semaphore(self.concurrency)
        async with self._sdk() as sdk:

            stop: list[EndpointError] = []  # set by the first fatal error: nothing more goes out

            async def one(index: int) -> tuple[int, ChatReply]:
                async with limit:
                    if stop:
                        raise stop[0]
                    try:
                        return index, await self._request(sdk, conversations[index], body)
                    except EndpointError as e:
                        stop.append(e)
                        raise

            tasks = [asyncio.create_task(one(i)) for i in range(len(conversations))]
            try:
                with tqdm(total=len(tasks), desc=desc, unit="request", leave=False, disable=not desc) as bar:
                    for next_done in asyncio.as_completed(tasks):
                        index, reply = await next_done
                        replies[index] = reply
                        if on_reply is not None:
                            on_reply(index, reply)
                        bar.update(1)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return replies  # type: ignore[return-value]

    def raise_if_failed(self, step: str) -> None:
        """End a step non-zero when any request failed for reasons of the endpoint."""
        if self.failures:
            raise self._failures_error(step, stopped_early=False)

    # -- one request (the SDK retries) --------------------------------------------------------------

    async def _request(self, sdk: openai.AsyncOpenAI, messages: Messages, body: dict) -> ChatReply:
        started = time.monotonic()
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, extra_body=body, extra_headers=self._headers
            )
            completion = raw.parse()
            choice = completion.choices[0]
            message = choice.message
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUSES:
                raise self._fatal(e) from None
            return self._failed(e, started)
        except (openai.APIError, ValueError, IndexError) as e:  # ValueError: a body that is not JSON
            return self._failed(e, started)
        # vLLM >= 0.10 names the field "reasoning"; older vLLM, SGLang and DeepSeek "reasoning_content".
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None) or ""
        usage = getattr(completion, "usage", None)
        return ChatReply(
            content=message.content or "",
            reasoning_content=reasoning if isinstance(reasoning, str) else "",
            finish_reason=choice.finish_reason,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
            requests=raw.retries_taken + 1,
            latency_s=time.monotonic() - started,
        )

    def _describe(self, error: Exception) -> tuple[str, str, bool]:
        """(message, kind, endpoint_failed) of a failed request; the key masked out."""
        if isinstance(error, openai.APITimeoutError):
            return f"timed out after {self.timeout_s:g} s", "timed out", True
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            detail = self._mask(str(cause)) or "no detail"
            return f"connection error ({type(cause).__name__}: {detail})", "connection error", True
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            failed = status >= 500 or status in _ENDPOINT_STATUSES
            return f"HTTP {status}: {self._snippet(error.response.text)}", f"HTTP {status}", failed
        detail = self._snippet(str(error))
        return f"malformed response ({type(error).__name__}: {detail})", "malformed response", True

    def _failed(self, error: Exception, started: float) -> ChatReply:
        message, kind, endpoint_failed = self._describe(error)
        # The SDK retries what the endpoint failed; a refused request (e.g. 400) was asked once.
        requests = self.max_retries + 1 if endpoint_failed and kind != "malformed response" else 1
        if requests > 1:
            message += f" (gave up after {requests} attempts)"
        log.warning("request to %s failed: %s", self.endpoint, message)
        if endpoint_failed:
            self.failures[kind] += 1
            if sum(self.failures.values()) > self.max_failed_requests:
                raise self._failures_error("", stopped_early=True)
        return ChatReply(requests=requests, latency_s=time.monotonic() - started, error=message,
                         endpoint_failed=endpoint_failed)

    def _failures_error(self, step: str, *, stopped_early: bool) -> EndpointFailures:
        total = sum(self.failures.values())
        how = ", ".join(f"{n} {kind}" for kind, n in self.failures.most_common())
        first = f"{step}: " if step else ""
        stop = (f"stopped early: more than max_failed_requests={self.max_failed_requests} failed. "
                if stopped_early else "")
        return EndpointFailures(
            f"{first}{total} request{'s' if total != 1 else ''} to {self.endpoint} (model {self.model!r}) failed "
            f"after {self.max_retries} retries ({how}). {stop}The replies that came back are saved; once the "
            "endpoint answers again, rerun the same command: it continues and asks only the failed and "
            "missing requests."
        )

    def _fatal(self, error: openai.APIStatusError) -> EndpointError:
        status = error.status_code
        return EndpointError(
            f"{self.endpoint} (model {self.model!r}) answered HTTP {status}: {FATAL_STATUSES[status]}. "
            f"Check the endpoint settings and {self._key_source}. Server said: {self._snippet(error.response.text)}"
        )

    def _snippet(self, text: str, limit: int = 300) -> str:
        text = " ".join(str(text).split())
        return self._mask(text[:limit] + ("..." if len(text) > limit else "")) or "(empty body)"

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text
