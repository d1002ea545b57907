"""A client for OpenAI-compatible chat endpoints (vLLM, SGLang, hosted APIs) over the `openai` SDK.

Shared by the distillation teacher and the evaluation judge. `openai.AsyncOpenAI` does the HTTP:
retries with backoff on 408/409/429/5xx, timeouts and dropped connections, `Retry-After`, typed
errors. What is the project's own:

- at most `concurrency` requests in flight, and one `ChatReply` per request, failures included;
- HTTP 401/403/404 (wrong key, URL or model) raise `EndpointError` at once;
- a request the endpoint failed after the retries (5xx, 429, timeout, connection, malformed body) is
  `endpoint_failed` and counted: past `max_failed_requests` the run stops (`EndpointFailures`), and
  a step ending with any calls `raise_if_failed`, so an outage is never a result;
- the API key only in the Authorization header: never in logs, errors, `repr` or files: a reply
  that echoes it (or any other configured secret, io.secrets) has it masked before anyone sees it;
- a 200 without `choices` is a malformed response (an endpoint failure); an endpoint that refuses
  (HTTP 400...) or answers empty every request is an `EndpointError`, not a run of rejected attempts
  or judge errors: at once after `EARLY_REFUSALS` such replies with no usable one, else at the step's
  end (`raise_if_failed`);
- reasoning read from `reasoning_content` (older vLLM, SGLang, DeepSeek) and `reasoning` (vLLM >= 0.10).

    client = ChatClient("http://qwq:8000/v1", "Qwen/QwQ-32B", api_key=None, concurrency=16)
    client.probe()  # GET /models: a dead endpoint or a refused key stops here, before any work
    replies = client.chat_many([[{"role": "user", "content": "..."}]], temperature=0.7, max_tokens=4096)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from tqdm.auto import tqdm

from medcritical.errors import InputError, UserError
from medcritical.io.secrets import mask_secrets, register_secret

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

# Never worth another try: the whole run would fail the same way.
FATAL_STATUSES = {
    401: "the API key was refused",
    403: "the API key may not use this model",
    404: "no such endpoint or model (base_url usually ends in /v1; check the model name)",
}


# Refused requests and empty replies, with no usable reply before them, that stop a run at once
# (the rest of the run would be refused the same way); fewer are judged at the step's end.
EARLY_REFUSALS = 3


class EndpointError(UserError, RuntimeError):
    """The endpoint refuses every request or cannot be reached: stop, fix the setting, rerun."""


class EndpointFailures(EndpointError):
    """Requests failed for reasons of the endpoint after the retries; a rerun asks exactly those again."""


@dataclass(frozen=True)
class ChatReply:
    content: str = ""
    reasoning_content: str = ""  # beside the content, from servers with a reasoning parser
    finish_reason: str | None = None  # "stop", "length" (hit max_tokens), ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0  # HTTP requests made, retries included
    latency_s: float = 0.0
    error: str | None = None  # why no usable reply came back; None on success
    # The endpoint failed, not the request: never an answer or an attempt; a rerun asks again.
    # False for a refused request (e.g. 400 prompt too long): that is an answer about the request.
    endpoint_failed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def safe_url(url: str) -> str:
    """The URL without any user:password it may carry, for messages and metadata."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


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
        self.base_url, self.model, self.concurrency = base_url.rstrip("/"), model, concurrency
        self.timeout_s, self.max_retries, self.max_failed_requests = timeout_s, max_retries, max_failed_requests
        self.extra_body = dict(extra_body or {})  # sent with every request, e.g. {"chat_template_kwargs": ...}
        self.failures: Counter[str] = Counter()  # endpoint failures so far, by kind ("HTTP 503", "timed out")
        self._api_key = api_key or ""
        register_secret(self._api_key)  # masked in every file written from now on
        self.usable = 0  # replies with text so far; while 0, refusals and empty replies add up to an error
        self.unusable: Counter[str] = Counter()  # refused requests and empty replies so far, by reason
        self._key_source = key_source  # named in the 401 message, so the user knows what to fix

    def __repr__(self) -> str:
        return f"ChatClient(base_url={self.endpoint!r}, model={self.model!r}, concurrency={self.concurrency})"

    @property
    def endpoint(self) -> str:
        return safe_url(self.base_url)

    @classmethod
    def from_section(cls, section, env_prefix: str, **kwargs) -> ChatClient:
        """From a recipe section (base_url, model, api_key_env and the client settings it has);
        base_url and model fall back to ``<env_prefix>_BASE_URL`` / ``_MODEL``; `kwargs` override."""
        base_url = section.base_url or os.environ.get(f"{env_prefix}_BASE_URL")
        model = section.model or os.environ.get(f"{env_prefix}_MODEL")
        for value, key, env in ((base_url, "base_url", "BASE_URL"), (model, "model", "MODEL")):
            if not value:
                raise InputError(
                    f"no endpoint {key}: set it in the recipe or the environment variable {env_prefix}_{env}"
                )
        names = ("concurrency", "timeout_s", "max_retries", "max_failed_requests", "extra_body")
        settings = {name: getattr(section, name) for name in names if hasattr(section, name)}
        settings["key_source"] = f"the environment variable {section.api_key_env}"
        return cls(base_url, model, os.environ.get(section.api_key_env), **(settings | kwargs))

    def _sdk(self) -> openai.AsyncOpenAI:
        import openai  # lazy: seconds of import for tasks that call no endpoint

        # The SDK insists on a key; with none, `_headers` omits the header, and OPENAI_API_KEY is never
        # read: someone's OpenAI key must not travel to a self-hosted teacher.
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._api_key or "none",
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    @property
    def _headers(self) -> dict:
        import openai  # lazy: seconds of import for tasks that call no endpoint

        return {} if self._api_key else {"Authorization": openai.Omit()}

    def probe(self) -> list[str]:
        """One cheap request (GET /models) before the first batch; the served model names.

        Raises `EndpointError` when the endpoint cannot be reached or refuses the key. A server
        without /models (404) is let through: the first request will tell."""

        import openai  # lazy: seconds of import for tasks that call no endpoint

        async def list_models() -> list[str]:
            async with self._sdk() as sdk:
                return [m.id async for m in sdk.models.list(extra_headers=self._headers)]

        try:
            models = asyncio.run(list_models())
        except openai.NotFoundError:
            return []
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUSES:
                raise self._fatal(e) from None
            raise EndpointError(
                f"{self.endpoint} is not answering: {self._describe(e)[0]}; start or fix it, then rerun"
            ) from None
        except (openai.APIError, ValueError) as e:
            raise EndpointError(
                f"{self.endpoint} cannot be reached: {self._describe(e)[0]}; start the server or "
                "fix base_url, then rerun"
            ) from None
        if models and self.model not in models:
            log.warning(
                "%s does not list the model %r (it serves %s)", self.endpoint, self.model, ", ".join(models[:10])
            )
        return models

    def chat_many(
        self,
        conversations: Sequence[Messages],
        *,
        on_reply: Callable[[int, ChatReply], None] | None = None,
        desc: str = "chat",
        request_params: Sequence[dict] | None = None,
        **params,
    ) -> list[ChatReply]:
        """Replies in the order of `conversations`; `on_reply(index, reply)` runs as each one arrives.

        `params` go into every request body (temperature, top_p, max_tokens, seed, logit_bias, ...;
        None values are left out); `request_params[i]`, when given, into request i's only (a per-request
        seed). An exception raised by `on_reply` cancels the requests in flight
        and propagates, as do `EndpointError` and `EndpointFailures`. Inside an event loop, await
        `achat_many`."""
        return asyncio.run(
            self.achat_many(conversations, on_reply=on_reply, desc=desc, request_params=request_params, **params)
        )

    async def achat_many(
        self,
        conversations: Sequence[Messages],
        *,
        on_reply: Callable[[int, ChatReply], None] | None = None,
        desc: str = "chat",
        request_params: Sequence[dict] | None = None,
        **params,
    ) -> list[ChatReply]:
        replies: list[ChatReply | None] = [None] * len(conversations)
        body = self.extra_body | {k: v for k, v in params.items() if v is not None}
        if request_params is not None and len(request_params) != len(conversations):
            raise ValueError(f"{len(request_params)} request_params for {len(conversations)} conversations")
        limit = asyncio.Semaphore(self.concurrency)
        stop: list[EndpointError] = []  # the first fatal error: nothing more goes out

        async def one(sdk: openai.AsyncOpenAI, index: int) -> tuple[int, ChatReply]:
            async with limit:
                if stop:
                    raise stop[0]
                own = body | request_params[index] if request_params is not None else body
                try:
                    return index, await self._request(sdk, conversations[index], own)
                except EndpointError as e:
                    stop.append(e)
                    raise

        async with self._sdk() as sdk:
            tasks = [asyncio.create_task(one(sdk, i)) for i in range(len(conversations))]
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
        self._check_any_usable(replies)  # type: ignore[arg-type]
        return replies  # type: ignore[return-value]

    def _check_any_usable(self, replies: Sequence[ChatReply]) -> None:
        """An endpoint that refuses or answers empty every request, and never answered before, is broken
        (a setting it does not accept, a model that writes nothing): stop instead of recording it all as
        rejected attempts or judge errors."""
        for reply in replies:
            if reply.ok and (reply.content.strip() or reply.reasoning_content.strip()):
                self.usable += 1
            elif not reply.endpoint_failed:
                self.unusable[reply.error or "an empty reply"] += 1
        if not self.usable and sum(self.unusable.values()) >= EARLY_REFUSALS:
            raise self._unusable_error()

    def _unusable_error(self) -> EndpointError:
        total = sum(self.unusable.values())
        how = ", ".join(f"{n} x {reason}" for reason, n in self.unusable.most_common(3))
        return EndpointError(
            f"{self.endpoint} (model {self.model!r}) gave no usable reply to any of {total} request"
            f"{'s' if total != 1 else ''} ({how}); check the endpoint and the request settings it may refuse "
            "(temperature, max_tokens, extra_body) or the model it serves, then rerun"
        )

    def raise_if_failed(self, step: str) -> None:
        """End a step non-zero when any request failed for reasons of the endpoint, or when not one
        reply of the step was usable (every request refused or answered empty)."""
        if self.failures:
            raise self._failures_error(step)
        if not self.usable and self.unusable:
            raise self._unusable_error()

    async def _request(self, sdk: openai.AsyncOpenAI, messages: Messages, body: dict) -> ChatReply:
        import openai  # lazy: seconds of import for tasks that call no endpoint

        started = time.monotonic()
        try:
            raw = await sdk.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, extra_body=body, extra_headers=self._headers
            )
            completion = raw.parse()
            if not completion.choices:  # a 200 without choices: not an answer
                raise ValueError("status 200 but no 'choices' in the body")
            choice = completion.choices[0]
            message = choice.message
            content, reasoning = message.content, _reasoning(message)
        except openai.APIStatusError as e:
            if e.status_code in FATAL_STATUSES:
                raise self._fatal(e) from None
            return self._failed(e, started)
        # ValueError: a body that is not JSON; the others: a JSON body without the fields of a completion
        except (openai.APIError, ValueError, IndexError, TypeError, AttributeError) as e:
            return self._failed(e, started)
        usage = completion.usage
        return ChatReply(
            content=mask_secrets(content) if isinstance(content, str) else "",
            reasoning_content=mask_secrets(reasoning),
            finish_reason=choice.finish_reason,
            prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
            requests=raw.retries_taken + 1,
            latency_s=time.monotonic() - started,
        )

    def _describe(self, error: Exception) -> tuple[str, str, bool]:
        """(message, kind, whether the endpoint failed) of a failed request, the key masked."""
        import openai  # lazy: seconds of import for tasks that call no endpoint

        if isinstance(error, openai.APITimeoutError):
            return f"timed out after {self.timeout_s:g} s", "timed out", True
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error
            return f"connection error ({type(cause).__name__}: {self._snippet(str(cause))})", "connection error", True
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            failed = status >= 500 or status in (408, 409, 429)  # what the SDK retries
            return f"HTTP {status}: {self._snippet(error.response.text)}", f"HTTP {status}", failed
        return f"malformed response ({type(error).__name__}: {self._snippet(str(error))})", "malformed response", True

    def _failed(self, error: Exception, started: float) -> ChatReply:
        message, kind, endpoint_failed = self._describe(error)
        # The SDK retried what the endpoint failed (not a malformed 200); a refused request went once.
        requests = self.max_retries + 1 if endpoint_failed and kind != "malformed response" else 1
        if requests > 1:
            message += f" (gave up after {requests} attempts)"
        log.warning("request to %s failed: %s", self.endpoint, message)
        if endpoint_failed:
            self.failures[kind] += 1
            if sum(self.failures.values()) > self.max_failed_requests:
                raise self._failures_error("", stopped_early=True)
        return ChatReply(
            requests=requests, latency_s=time.monotonic() - started, error=message, endpoint_failed=endpoint_failed
        )

    def _failures_error(self, step: str, stopped_early: bool = False) -> EndpointFailures:
        total = sum(self.failures.values())
        how = ", ".join(f"{n} {kind}" for kind, n in self.failures.most_common())
        stop = (
            f"Stopped early: more than max_failed_requests={self.max_failed_requests} failed. " if stopped_early else ""
        )
        return EndpointFailures(
            f"{step + ': ' if step else ''}{total} request{'s' if total != 1 else ''} to {self.endpoint} "
            f"(model {self.model!r}) failed after {self.max_retries} retries ({how}). {stop}The replies that came "
            "back are saved; once the endpoint answers again, rerun the same command: it asks only the failed "
            "and missing requests."
        )

    def _fatal(self, error: openai.APIStatusError) -> EndpointError:
        status = error.status_code
        return EndpointError(
            f"{self.endpoint} (model {self.model!r}) answered HTTP {status}: {FATAL_STATUSES[status]}. "
            f"Check the endpoint settings and {self._key_source}. Server said: {self._snippet(error.response.text)}"
        )

    def _snippet(self, text: str, limit: int = 300) -> str:
        text = " ".join(str(text).split())
        text = mask_secrets(text.replace(self._api_key, "***") if self._api_key else text)
        return text[:limit] + ("..." if len(text) > limit else "") or "(empty body)"


def _reasoning(message) -> str:
    # vLLM >= 0.10 names the field "reasoning"; older vLLM, SGLang and DeepSeek "reasoning_content".
    reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None) or ""
    return reasoning if isinstance(reasoning, str) else ""
