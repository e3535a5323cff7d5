"""A conversation: turns of messages answered one after another by one engine.

Every turn sends the whole history through the chat template; the engine's prompt cache
keeps the keys and values of what the last turn already ran, so a turn prefills only the
new message (and whatever the template re-tokenizes differently)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from llmcad.generate import Generation, GenerationStats, Piece

if TYPE_CHECKING:
    from llmcad.engine import Engine


class Conversation:
    """`messages` is the history as chat messages ({"role", "content"}), JSON-ready.

    An answer cut short (max_tokens, a stop string, the caller closing the stream or
    Ctrl-C) stays in the history as far as it was streamed; a turn that fails before its
    first piece (a prompt too long for the context) leaves the history as it was."""

    def __init__(self, engine: Engine, system: str | None = None, messages: list[dict] | None = None):
        self.engine = engine
        self.messages: list[dict] = list(messages or [])
        if system is not None:
            self.messages = [m for m in self.messages if m["role"] != "system"]
            self.messages.insert(0, {"role": "system", "content": system})
        self.last_prompt: list[int] = []  # the last turn's prompt, as token ids
        self.last_stats: GenerationStats | None = None  # the last finished turn's

    def stream(self, text: str, **options) -> Iterator[Piece]:
        """Add the user's `text` and stream the answer; options as `Engine.stream`, with
        `max_tokens` defaulting to the rest of the context window."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[Piece] = []
        try:
            ids = self.last_prompt = self.engine.chat_prompt(self.messages)
            options.setdefault("max_tokens", self.engine.max_context - len(ids))
            for piece in self.engine.stream(ids, **options):
                pieces.append(piece)
                yield piece
        finally:
            if pieces:
                self.messages.append({"role": "assistant", "content": "".join(p.text for p in pieces)})
                if pieces[-1].stats is not None:
                    self.last_stats = pieces[-1].stats
            else:
                self.messages.pop()

    def say(self, text: str, **options) -> Generation:
        """Add the user's `text` and return the whole answer."""
        pieces = list(self.stream(text, **options))
        final = pieces[-1]
        return Generation("".join(p.text for p in pieces), [t for p in pieces for t in p.token_ids], self.last_prompt, final.finish_reason, final.stats)

    def reset(self) -> None:
        """Forget every turn, keeping the system message."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
