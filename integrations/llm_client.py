"""A client for OpenAI-compatible chat servers (OpenAI, a local vLLM, any server with ``/v1/chat/completions``),
for the two LLM roles of the method: the pair editor (:class:`~.data.editors.OpenAIEditor`) and the judge of
open answers (:class:`AnswerJudge`).

Standard library HTTP only. Every reply is cached on disk under a hash of the request (server, model,
messages, sampling settings; never the key), so a rerun sends nothing it sent before. Requests that fail for a
passing reason (no connection, HTTP 408/409/429/5xx) are retried with exponential backoff; a request budget
caps what one run may send. A missing key, a server that never answers, a refused key, or a spent budget stop
the run with one message naming what to change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .cli import write_whole

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
_RETRYABLE = {408, 409, 429, 500, 502, 503, 504}


def default_cache_dir() -> Path:
    """``$FIREMPO_LLM_CACHE``, else ``~/.cache/firempo-kernels/llm``."""
    env = os.environ.get("FIREMPO_LLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "firempo-kernels" / "llm"


class LLMError(ValueError):
    """The server, the key or the budget stops the run; the message says what to change."""


class ChatClient:
    """Chat completions from an OpenAI-compatible server, cached on disk, retried, within a request budget.

    Args:
        model: the served model's name (``gpt-4o-mini``, or what a vLLM serves).
        base_url: the API root, up to and including ``/v1``.
        api_key_env: the environment variable holding the key (a local server that checks none still needs
            the variable set, to any value, so that a forgotten key is never a silent anonymous request).
        cache_dir: where replies are kept (None: :func:`default_cache_dir`); ``use_cache=False`` turns it off.
        max_requests: how many requests this client may send (cache hits are free); None for no cap.
        max_retries: retries of a request that failed for a passing reason, with delays
            ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``).
        timeout: seconds to wait for one reply.
        temperature, max_tokens: sampling settings sent with every request (0: greedy, reproducible).
        sleep: the waiting function (tests pass one that records the delays).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = DEFAULT_KEY_ENV,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        max_requests: int | None = None,
        max_retries: int = 5,
        backoff: float = 1.0,
        timeout: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int = 512,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"ChatClient: `model` must be a non-empty string; got {model!r}")
        if not isinstance(base_url, str) or not re.match(r"https?://", base_url):
            raise ValueError(
                f"ChatClient: `base_url` must be an http(s) URL such as {DEFAULT_BASE_URL}; got {base_url!r}")
        for name, value, least in (("max_retries", max_retries, 0), ("max_tokens", max_tokens, 1),
                                   ("max_requests", 0 if max_requests is None else max_requests, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ChatClient: `{name}` must be an int >= {least}; got {value!r}")
        key = os.environ.get(api_key_env, "")
        if not key.strip():
            raise LLMError(
                f"no API key: the environment variable {api_key_env} is not set. Export the key "
                f"(`export {api_key_env}=...`); a local server that checks none takes any value (e.g. EMPTY)"
            )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._key = key.strip()
        self.cache_dir = None if not use_cache else Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_requests = max_requests
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.sleep = sleep
        self.sent = 0  #: HTTP requests sent (retries included)
        self.cached = 0  #: replies served from the cache

    def _payload(self, messages: Sequence[dict[str, str]]) -> dict[str, Any]:
        return {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def cache_key(self, messages: Sequence[dict[str, str]]) -> str:
        """The hex SHA-256 of the request (server, model, messages, sampling settings), the cache file's name."""
        body = json.dumps({"url": self.base_url, **self._payload(messages)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()

    def chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The assistant's reply to ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str}]``).

        Raises:
            ValueError: ``messages`` malformed.
            LLMError: the budget is spent, the server does not answer after the retries, or it refuses the
                request (the key, the model's name).
        """
        if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("ChatClient.chat: `messages` must be a non-empty list of {role, content} strings; "
                             f"got {messages!r:.120}")
        key = self.cache_key(messages)
        path = None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"
        if path is not None and path.is_file():
            try:
                reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
                self.cached += 1
                return reply
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged cache entry is asked again and rewritten
        reply = self._request(self._payload(messages))
        if path is not None:
            write_whole(path, json.dumps({"request": self._payload(messages), "url": self.base_url, "reply": reply},
                                         ensure_ascii=False))
        return reply

    def _request(self, payload: dict[str, Any]) -> str:
        url = f"{self.base_url}/chat/completions"
        data = json.dumps(payload).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            if self.max_requests is not None and self.sent >= self.max_requests:
                raise LLMError(f"request budget spent: {self.sent} request(s) sent to {self.base_url} (max_requests "
                               f"{self.max_requests}); raise it (--max-requests) or rerun: cached replies cost nothing")
            self.sent += 1
            req = urllib.request.Request(url, data=data, method="POST", headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
            delay = self.backoff * 2**attempt
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = json.loads(resp.read().decode("utf-8"))
                return _reply_text(body, url)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code in (401, 403):
                    raise LLMError(f"{url} refused the key (HTTP {e.code}: {detail}); check the API key") from None
                if e.code not in _RETRYABLE:
                    raise LLMError(f"{url} refused the request (HTTP {e.code}: {detail}); check the model name "
                                   f"({self.model!r}) and --base-url") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = float(retry_after)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = str(getattr(e, "reason", e))
            if attempt < self.max_retries:
                self.sleep(delay)
        raise LLMError(f"no answer from {url} after {self.max_retries + 1} attempt(s) ({last}); is the server "
                       "running and --base-url right?")


def _reply_text(body: Any, url: str) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"{url} answered without choices[0].message.content: {json.dumps(body)[:300]}") from None
    if not isinstance(content, str):
        raise LLMError(f"{url} answered a non-text message content: {content!r:.200}")
    return content


def json_objects(reply: str) -> Iterator[dict[str, Any]]:
    """The JSON objects in ``reply``, in order (models wrap JSON in prose or code fences)."""
    if not isinstance(reply, str):
        raise TypeError(f"json_objects: `reply` must be a str; got {type(reply).__name__}")
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", reply):
        try:
            obj, _ = decoder.raw_decode(reply, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


JUDGE_PROMPT = """You grade answers to questions about medical images.
Question: {question}
Reference answer: {ground_truth}
Model answer: {answer}
Does the model answer state the same finding as the reference answer? Wording may differ; a different or
additional clinical claim that contradicts the reference is wrong.
Reply with JSON only: {{"correct": true or false}}
"""


class AnswerJudge:
    """Judges open answers against the reference with an LLM: ``judge(question, ground_truth, answer) -> bool``.

    Args:
        client: a :class:`ChatClient` (its cache makes a rerun free).
        prompt: a format string with ``{question}``, ``{ground_truth}`` and ``{answer}``.

    A reply without ``{"correct": true|false}`` gives None (counted as unjudged, not as wrong).
    """

    def __init__(self, client: ChatClient, prompt: str = JUDGE_PROMPT) -> None:
        if not hasattr(client, "chat"):
            raise TypeError(f"AnswerJudge: `client` must have a chat(messages) method; got {type(client).__name__}")
        self.client = client
        self.prompt = prompt

    def __call__(self, question: str, ground_truth: str, answer: str) -> bool | None:
        reply = self.client.chat([{"role": "user", "content": self.prompt.format(
            question=question, ground_truth=ground_truth, answer=answer)}])
        verdicts = [o["correct"] for o in json_objects(reply) if isinstance(o.get("correct"), bool)]
        return verdicts[0] if verdicts else None


def parse_llm_spec(spec: str) -> str | None:
    """The model name of an ``openai:MODEL`` spec, None for any other spec."""
    if isinstance(spec, str) and spec.startswith("openai:"):
        model = spec[len("openai:"):].strip()
        if not model:
            raise ValueError(f"`openai:MODEL` needs a model name (e.g. openai:gpt-4o-mini); got {spec!r}")
        return model
    return None


__all__ = [
    "AnswerJudge", "ChatClient", "DEFAULT_BASE_URL", "DEFAULT_KEY_ENV", "JUDGE_PROMPT", "LLMError",
    "default_cache_dir", "json_objects", "parse_llm_spec",
]
