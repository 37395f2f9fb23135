"""LLM providers for SMS and email replies: Anthropic Messages and OpenAI Chat Completions.

Plain HTTPS through aiohttp (no vendor SDKs on the event loop), base URLs from settings so
tests point them at a local fake. Every failure (timeout, non-2xx, malformed JSON) becomes one
``LlmError``; callers answer with a canned reply instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from engine.config import Settings, secret

log = logging.getLogger("xswarm.webhooks.llm")


class LlmError(Exception):
    """The provider gave no usable answer; the message says why (never the key)."""


class LlmProvider(Protocol):
    name: str

    async def complete(self, system: str, prompt: str, *, max_tokens: int) -> str: ...


@dataclass
class _HttpProvider:
    session: aiohttp.ClientSession
    api_key: str
    model: str
    base_url: str
    timeout_s: float

    async def _post(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Any:
        url = self.base_url.rstrip("/") + path
        try:
            async with self.session.post(
                url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise LlmError(f"{url} answered {resp.status}: {text[:200]}")
                return json.loads(text)
        except TimeoutError:
            raise LlmError(f"{url} took longer than {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise LlmError(f"{url} unreachable: {exc}") from None
        except ValueError as exc:
            raise LlmError(f"{url} sent malformed JSON: {exc}") from None


class AnthropicProvider(_HttpProvider):
    name = "anthropic"

    async def complete(self, system: str, prompt: str, *, max_tokens: int) -> str:
        data = await self._post(
            "/v1/messages",
            {"x-api-key": self.api_key, "anthropic-version": "2023-06-01"},
            {
                "model": self.model,
                "max_tokens": max_tokens,
                "system": system,
                "messages": [{"role": "user", "content": prompt}],
            },
        )
        try:
            text = "".join(b.get("text", "") for b in data["content"] if b.get("type") == "text")
        except (KeyError, TypeError, AttributeError):
            raise LlmError("anthropic answer has no content") from None
        if not text.strip():
            raise LlmError("anthropic answer is empty")
        return text.strip()


class OpenAIProvider(_HttpProvider):
    name = "openai"

    async def complete(self, system: str, prompt: str, *, max_tokens: int) -> str:
        data = await self._post(
            "/v1/chat/completions",
            {"Authorization": f"Bearer {self.api_key}"},
            {
                "model": self.model,
                "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            },
        )
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LlmError("openai answer has no choices") from None
        if not text.strip():
            raise LlmError("openai answer is empty")
        return text.strip()


def provider_from_settings(settings: Settings, session: aiohttp.ClientSession) -> LlmProvider | None:
    """The configured provider, or None (``auto`` prefers Anthropic, then OpenAI)."""
    llm = settings.llm
    anthropic_key, openai_key = secret(llm.anthropic_api_key), secret(llm.openai_api_key)
    choice = llm.provider
    if choice == "auto":
        choice = "anthropic" if anthropic_key else "openai" if openai_key else "none"
    if choice == "anthropic" and anthropic_key:
        return AnthropicProvider(session, anthropic_key, llm.anthropic_model, llm.anthropic_base_url, llm.timeout_s)
    if choice == "openai" and openai_key:
        return OpenAIProvider(session, openai_key, llm.openai_model, llm.openai_base_url, llm.timeout_s)
    if choice != "none":
        log.warning("LLM provider %s chosen but its API key is not set; replies will be canned", choice)
    return None
