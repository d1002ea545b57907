"""A client for OpenAI-compatible chat endpoints (vLLM, SGLang, hosted APIs).

Shared by the distillation teacher and the evaluation judge. Many conversations go out concurrently
(at most `concurrency` in flight) and each comes back as a `ChatReply`, failures included, so one bad
request never loses the others. Rate limits (429), server errors (5xx), timeouts and dropped
connections are retried with exponential backoff and jitter. A wrong key, URL or model name
(HTTP 401/403/404) raises `EndpointError` at once: every further request would fail the same way.

The API key goes into the Authorization header and nowhere else: not into logs, error messages or
`repr`, and any echo of it in a server's error text is masked.

    client = ChatClient("http://qwq:8000/v1", "Qwen/QwQ-32B", api_key=None, concurrency=16)
    replies = client.chat_many([[{"role": "user", "content": "..."}]], temperature=0.7, max_tokens=4096)
    replies[0].content, replies[0].reasoning_content, replies[0].completion_tokens, replies[0].error
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# Worth another try: the server is busy, restarting or briefly unreachable.
RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Never worth another try: the whole run would fail the same way.
FATAL_STATUSES = {
    401: "the API key was refused",
    403: "the API key may not use this model",
    404: "no such endpoint or model (base_url usually ends in /v1; check the model name)",
}


class EndpointError(RuntimeError):
    """The endpoint refuses every request (bad key, URL or model): stop, fix the setting, rerun."""


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

    @property
    def ok(self) -> bool:
        return self.error is None


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
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
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
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.extra_body = dict(extra_body or {})  # e.g. {"chat_template_kwargs": {...}}, sent with every request
        self._api_key = api_key or None
        self._key_source = key_source  # named in the 401 message, so the user knows what to fix

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

    @classmethod
    def from_section(cls, section, env_prefix: str, **kwargs) -> "ChatClient":
        """Build from a recipe section: base_url, model, api_key_env and any of concurrency, timeout_s,
        max_retries, backoff_s, max_backoff_s, extra_body (`kwargs` override them).

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
            for name in ("concurrency", "timeout_s", "max_retries", "backoff_s", "max_backoff_s", "extra_body")
            if hasattr(section, name)
        }
        settings["key_source"] = f"the environment variable {section.api_key_env}"
        return cls(base_url, model, os.environ.get(section.api_key_env), **(settings | kwargs))

    # -- public API -------------------------------------------------------------------------------

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

        `params` go into every request body (temperature, top_p, max_tokens, seed, stop, ...; None
        values are left out). An exception raised by `on_reply` cancels the requests in flight and
        propagates, as does `EndpointError`.
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
        replies: list[ChatReply | None] = [None] * len(conversations)
        if not conversations:
            return []
        limit = asyncio.Semaphore(self.concurrency)
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        async with httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        ) as http:

            async def one(index: int) -> tuple[int, ChatReply]:
                async with limit:
                    return index, await self._request(http, conversations[index], params)

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

    # -- one request with retries ------------------------------------------------------------------

    async def _request(self, http: httpx.AsyncClient, messages: Messages, params: dict) -> ChatReply:
        body = {"model": self.model, "messages": messages, **self.extra_body}
        body.update({k: v for k, v in params.items() if v is not None})
        url = f"{self.base_url}/chat/completions"
        started = time.monotonic()
        error, retry_after = "no request made", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1, retry_after))
            retry_after = None
            try:
                response = await http.post(url, json=body)
            except httpx.TimeoutException:
                error = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as e:
                error = f"connection error ({type(e).__name__}: {self._mask(str(e)) or 'no detail'})"
            else:
                status = response.status_code
                if status in FATAL_STATUSES:
                    raise EndpointError(
                        f"{url} (model {self.model!r}) answered HTTP {status}: {FATAL_STATUSES[status]}. "
                        f"Check the endpoint settings and {self._key_source}. Server said: {self._snippet(response)}"
                    )
                if status == 200:
                    return self._parse(response, attempt + 1, time.monotonic() - started)
                error = f"HTTP {status}: {self._snippet(response)}"
                if status not in RETRY_STATUSES and status < 500:
                    break  # e.g. 400 prompt too long: this request is wrong, not the server busy
                retry_after = _retry_after_seconds(response)
            log.debug("request to %s failed (%s); attempt %d of %d", url, error, attempt + 1, self.max_retries + 1)
        else:
            tries = self.max_retries + 1
            error += f" (gave up after {tries} attempt{'s' if tries > 1 else ''})"
        log.warning("request to %s failed: %s", url, error)
        return ChatReply(requests=attempt + 1, latency_s=time.monotonic() - started, error=error)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        """Exponential with jitter (half to full of the doubled delay), or the server's Retry-After."""
        delay = min(self.max_backoff_s, self.backoff_s * 2**retry)
        delay = random.uniform(delay / 2, delay)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay

    def _parse(self, response: httpx.Response, requests: int, latency_s: float) -> ChatReply:
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ChatReply(
                requests=requests,
                latency_s=latency_s,
                error=f"malformed response (no choices[0].message): {self._snippet(response)}",
            )
        usage = data.get("usage") or {}
        # vLLM >= 0.10 names the field "reasoning"; older vLLM, SGLang and DeepSeek "reasoning_content".
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        return ChatReply(
            content=message.get("content") or "",
            reasoning_content=reasoning if isinstance(reasoning, str) else "",
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            requests=requests,
            latency_s=latency_s,
        )

    def _snippet(self, response: httpx.Response, limit: int = 300) -> str:
        text = " ".join(response.text.split())
        return self._mask(text[:limit] + ("..." if len(text) > limit else "")) or "(empty body)"

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare for APIs; the exponential backoff applies
