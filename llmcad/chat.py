"""`llmcad chat`: a conversation in the terminal, or driven line by line through a pipe.

`run_chat` is the whole loop (reading messages, the slash commands, streaming answers,
Ctrl-C); the command line only loads the engine and calls it. Every turn goes through a
`Conversation`, so the chat template sees the whole history and the engine's prompt cache
prefills only what is new."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from llmcad.errors import LlmcadError

if TYPE_CHECKING:
    from llmcad.conversation import Conversation
    from llmcad.generate import GenerationStats

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'
ROLES = ("system", "user", "assistant")

HELP = f"""\
Type a message and press Enter; the answer streams back. Commands:
  /reset        start over (the system message stays)
  /stats        the last answer's figures: tokens/s, tokens per verification,
                bytes streamed, prompt tokens reused from the cache
  /save FILE    write the conversation to FILE as a JSON list of messages
  /load FILE    replace the conversation with the messages in FILE
  /help         this text
  /exit         quit (so does Ctrl-D)
Multi-line messages: end a line with \\ to continue on the next one, or put the
message between two lines holding only {BLOCK} (a message that starts with / is
sent as text inside such a block).
Ctrl-C stops an answer under way and keeps what was said; at the prompt it clears
the line."""


class _Chat:
    def __init__(self, conversation: Conversation, read: Callable[[str], str], output: TextIO, errors: TextIO, interactive: bool, options: dict):
        self.conversation = conversation
        self.read = read
        self.output = output
        self.errors = errors
        self.interactive = interactive
        self.options = {k: v for k, v in options.items() if v is not None}
        self.stats: GenerationStats | None = None  # the last answer's, None if it was stopped
        self.stopped = False  # the last answer was cut short by Ctrl-C

    def note(self, text: str) -> None:
        print(text, file=self.errors, flush=True)

    def error(self, text: str) -> None:
        self.note(f"llmcad: error: {text}")

    def say(self, text: str) -> None:
        print(text, file=self.output, flush=True)

    def message(self) -> tuple[str, bool]:
        """The next message, its lines joined, and whether it is a /command (a single line
        starting with /, typed at the prompt). Raises EOFError at the end of the input when
        nothing was gathered; a message cut off by the end is returned as it is."""
        lines: list[str] = []
        block = False
        while True:
            try:
                line = self.read(CONTINUATION if lines or block else PROMPT)
            except EOFError:
                if lines:
                    return "\n".join(lines), False
                raise
            if not lines and not block and line.lstrip().startswith("/"):
                return line.strip(), True
            if line.strip() == BLOCK:
                if block:
                    return "\n".join(lines), False
                if not lines:  # opens a block; a """ line after a \ continuation is text
                    block = True
                    continue
            if block:
                lines.append(line)
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines), False

    def run(self) -> int:
        while True:
            try:
                text, command = self.message()
            except EOFError:
                if self.interactive:
                    self.say("")
                return 0
            except KeyboardInterrupt:  # at the prompt: drop the line, ask again
                self.say("")
                self.note("(/exit or Ctrl-D quits)")
                continue
            if command:
                if self.command(text) == "exit":
                    return 0
            elif text.strip():
                self.turn(text)

    def turn(self, text: str) -> None:
        stream = self.conversation.stream(text, **self.turn_options(text))
        pieces = 0
        final = None
        try:
            for piece in stream:
                pieces += 1
                self.output.write(piece.text)
                self.output.flush()
                final = piece
        except KeyboardInterrupt:
            stream.close()  # the answer so far stays in the history
            self.stats, self.stopped = None, True
            self.say("")
            self.note("[stopped]" if pieces else "[stopped before the answer began]")
            return
        except LlmcadError as e:
            if pieces:
                self.say("")
            hint = " (/reset starts a new conversation)" if "context window" in str(e) else ""
            self.error(f"{e}{hint}")
            return
        finally:
            stream.close()
        self.say("")
        self.stopped = False
        self.stats = final.stats if final is not None else None
        if self.interactive and self.stats is not None:
            self.note(f"[{self.summary(self.stats, final.finish_reason)}]")

    def turn_options(self, text: str) -> dict:
        """The options for answering `text`: max_tokens is a most, cut to the room the
        context window has left (when none is left, the turn fails as it would)."""
        options = dict(self.options)
        if "max_tokens" in options:
            engine = self.conversation.engine
            try:
                prompt = engine.chat_prompt([*self.conversation.messages, {"role": "user", "content": text}])
            except LlmcadError:
                return options  # the turn fails with the same error
            room = engine.max_context - len(prompt)
            if room >= 1:
                options["max_tokens"] = min(options["max_tokens"], room)
        return options

    @staticmethod
    def summary(s: GenerationStats, finish_reason: str | None) -> str:
        """One short line: the figures a user wants after each answer."""
        parts = [f"{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tok/s"]
        if "tokens_per_verification" in s.extra:
            parts.append(f"{s.extra['tokens_per_verification']:.2f} per verification")
        parts.append(f"prompt {s.prompt_tokens} ({s.extra.get('prompt_tokens_reused', 0)} cached)")
        if s.extra.get("bytes_read"):
            parts.append(f"streamed {s.extra['bytes_read'] / 2**20:.0f} MB")
        if finish_reason == "length":
            parts.append("cut at the token limit")
        return ", ".join(parts)

    def show_stats(self) -> None:
        s = self.stats
        if s is None:
            self.say("no figures: the last answer was stopped before its end" if self.stopped else "no answer yet")
            return
        x = s.extra
        rows = [
            ("mode", f"{x.get('mode', '?')}, {x.get('precision', '?')}"),
            ("prompt", f"{s.prompt_tokens} tokens, {x.get('prompt_tokens_reused', 0)} reused from the cache, {s.prefill_tokens_per_s:.1f} tok/s prefill ({s.prefill_s:.2f} s)"),
            ("answer", f"{s.new_tokens} tokens, {s.decode_tokens_per_s:.2f} tok/s decode ({s.decode_s:.2f} s)"),
        ]
        if "tokens_per_verification" in x:
            rows.append(("verification", f"{x['tokens_per_verification']:.2f} tokens per verification ({x.get('verifications', 0)} verifications)"))
        if x.get("bytes_read"):
            rows.append(("streamed", f"{x['bytes_read'] / 2**20:.1f} MB read from storage"))
        if s.peak_rss_mb:
            rows.append(("peak RSS", f"{s.peak_rss_mb:.0f} MB"))
        for name, value in rows:
            self.say(f"{name + ':':<14}{value}")

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.conversation.reset()
            self.stats, self.stopped = None, False
            self.note("[conversation reset]")
        elif name == "/stats":
            self.show_stats()
        elif name in ("/save", "/load"):
            if not arg:
                self.error(f"usage: {name} FILE")
            elif name == "/save":
                self.save(Path(arg).expanduser())
            else:
                self.load(Path(arg).expanduser())
        else:
            self.error(f"unknown command {name} (/help lists the commands)")
        return None

    def save(self, path: Path) -> None:
        messages = self.conversation.messages
        try:
            path.write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        except OSError as e:
            self.error(f"cannot write {path}: {e.strerror or e}")
            return
        self.note(f"[saved {len(messages)} messages to {path}]")

    def load(self, path: Path) -> None:
        try:
            messages = read_messages(path)
        except LlmcadError as e:
            self.error(str(e))
            return
        self.conversation.messages = messages
        self.stats, self.stopped = None, False
        self.note(f"[loaded {len(messages)} messages from {path}]")


def read_messages(path: Path) -> list[dict]:
    """The messages saved in `path` (a JSON list of {"role", "content"}), checked; every
    problem is one LlmcadError saying what and where."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LlmcadError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise LlmcadError(f"{path}: not UTF-8 text") from e
    except json.JSONDecodeError as e:
        raise LlmcadError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    return check_messages(data, str(path))


def check_messages(data, source: str = "messages") -> list[dict]:
    """`data` as a list of {"role", "content"} messages, or an LlmcadError."""
    if not isinstance(data, list):
        raise LlmcadError(f'{source}: expected a JSON list of messages ({{"role": ..., "content": ...}}), got {type(data).__name__}')
    messages = []
    for i, m in enumerate(data):
        where = f"{source}: message {i}"
        if not isinstance(m, dict):
            raise LlmcadError(f"{where}: expected an object with role and content, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise LlmcadError(f"{where}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise LlmcadError(f"{where}: content must be a string")
        if m["role"] == "system" and i != 0:
            raise LlmcadError(f"{where}: a system message may only come first")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _terminal_reader() -> Callable[[str], str]:
    """`input`, with Python's readline line editor (arrows, history kept across sessions
    in LLMCAD_HOME/chat_history) where the platform has it."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: input() still works, unedited
        return input
    import atexit

    from llmcad.hub import llmcad_home

    history = llmcad_home() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)
    return input


def _stream_reader(stream: TextIO, output: TextIO, interactive: bool) -> Callable[[str], str]:
    def read(prompt: str) -> str:
        if interactive:
            output.write(prompt)
            output.flush()
        line = stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    return read


def run_chat(
    conversation: Conversation,
    input_stream: TextIO,
    output: TextIO,
    interactive: bool,
    options: dict,
    errors: TextIO | None = None,
    banner: str | None = None,
) -> int:
    """Chat over `conversation` until the input ends or /exit; returns the exit status (0).

    `options` go to every turn's `Conversation.stream` (max_tokens, temperature, seed, ...;
    None values are left out). `interactive`: prompts, a banner and a stats line after each
    answer (on `errors`, default stderr); the line editor when `input_stream` is this
    process's terminal. Otherwise one message per line, no prompts, and each answer on
    `output` followed by a newline. Failed turns print one `llmcad: error: ...` line on
    `errors` and the chat goes on."""
    errors = errors if errors is not None else sys.stderr
    if interactive and input_stream is sys.stdin and sys.stdin.isatty():
        read = _terminal_reader()
    else:
        read = _stream_reader(input_stream, output, interactive)
    if interactive:
        if banner:
            print(banner, file=errors)
        print("/help for commands, Ctrl-D or /exit to quit", file=errors, flush=True)
    return _Chat(conversation, read, output, errors, interactive, options).run()
