"""`llmcad chat`: the loop of `llmcad.chat.run_chat` driven through StringIO (answers equal
to uncached turns, the commands, multi-line input, Ctrl-C mid-answer), and the command run
once for real with two messages on a pipe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_hf

from llmcad.chat import HELP, check_messages, run_chat
from llmcad.engine import Engine
from llmcad.errors import LlmcadError

GREEDY = dict(max_tokens=12, temperature=0.0)
MESSAGES = ["hello world", "The quick brown fox", "def add(a, b):"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy machine they spin
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    with Engine.load(tiny_llama, precision="fp32", progress=False) as engine:
        yield engine


@pytest.fixture(scope="module", params=["ar", "llmcad"])
def any_engine(request, engine, tiny_llama, tmp_path_factory) -> Engine:
    """The tiny target alone, and with a draft (the target's weights perturbed)."""
    if request.param == "ar":
        yield engine
        return
    draft = make_tiny_hf(tmp_path_factory.mktemp("chat-draft"), "llama", noise=0.01)
    with Engine.load(tiny_llama, draft=draft, precision="fp32", draft_precision="fp32", progress=False) as pair:
        assert pair.mode == "llmcad"
        yield pair


def chat(conversation, text: str, options: dict = GREEDY, interactive: bool = False, output=None) -> tuple[str, str]:
    """Run the chat loop over `text` as its input; returns (stdout, stderr)."""
    out, err = io.StringIO() if output is None else output, io.StringIO()
    assert run_chat(conversation, io.StringIO(text), out, interactive, options, errors=err) == 0
    return out.getvalue(), err.getvalue()


def uncached_turns(engine: Engine, history: list[dict], user_texts: list[str], options: dict = GREEDY) -> list[dict]:
    """`history` continued by answering each of `user_texts` with the whole conversation
    prefilled from scratch, as a chat without the prompt cache would."""
    messages = list(history)
    for text in user_texts:
        messages.append({"role": "user", "content": text})
        answer = engine.chat(messages, **options, cache_prompt=False)
        messages.append({"role": "assistant", "content": answer.text})
    return messages


def answers(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def test_piped_turns_equal_uncached_turns(any_engine):
    conversation = any_engine.conversation(system="You are terse.")
    out, err = chat(conversation, "".join(m + "\n" for m in MESSAGES))
    expected = uncached_turns(any_engine, [{"role": "system", "content": "You are terse."}], MESSAGES)
    assert conversation.messages == expected
    assert out == "".join(a + "\n" for a in answers(expected))  # no prompts, no banner
    assert err == ""  # nor a stats line when not interactive
    # the last turn reused at least the previous turns' prompt from the cache
    assert conversation.last_stats.extra["prompt_tokens_reused"] > 0


def test_reset_save_load_round_trip(engine, tmp_path):
    saved = tmp_path / "chat.json"
    conversation = engine.conversation(system="Be brief.")
    out, err = chat(conversation, f"hello world\n/save {saved}\n/reset\nThe quick brown fox\n/load {saved}\ndef add(a, b):\n/stats\n")
    first = uncached_turns(engine, [{"role": "system", "content": "Be brief."}], ["hello world"])
    assert json.loads(saved.read_text(encoding="utf-8")) == first
    # after /reset the system message stays and the turn starts afresh
    after_reset = uncached_turns(engine, [{"role": "system", "content": "Be brief."}], ["The quick brown fox"])
    # /load replaced the conversation with the saved one, which the last turn continued
    assert conversation.messages == uncached_turns(engine, first, ["def add(a, b):"])
    assert out.startswith("".join(a + "\n" for a in answers(first) + answers(after_reset) + [answers(conversation.messages)[-1]]))
    stats = out.splitlines()[-4:]
    assert stats[0] == "mode:         ar, fp32", out
    assert stats[1].startswith("prompt:") and "reused from the cache" in stats[1], out
    assert stats[2].startswith("answer:") and "tok/s" in stats[2], out
    assert "llmcad: error" not in err
    assert f"saved 3 messages to {saved}" in err and f"loaded 3 messages from {saved}" in err and "reset" in err


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ('{"role": "user", "content": "hi"}', "expected a JSON list"),
        ('["hi"]', "message 0: expected an object"),
        ('[{"role": "robot", "content": "hi"}]', "role must be one of"),
        ('[{"role": "user", "content": 3}]', "content must be a string"),
        ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]', "system message may only come first"),
        (b"\xff\xfe[]", "not UTF-8"),
    ],
)
def test_bad_load_is_one_error_line_and_the_chat_goes_on(engine, tmp_path, content, message):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    conversation = engine.conversation()
    out, err = chat(conversation, f"hello world\n/load {path}\nThe quick brown fox\n")
    assert err.count("\n") == 1 and err.startswith("llmcad: error: ") and message in err, err
    expected = uncached_turns(engine, [], ["hello world", "The quick brown fox"])
    assert conversation.messages == expected  # the failed load changed nothing
    assert out == "".join(a + "\n" for a in answers(expected))


def test_check_messages_keeps_role_and_content_only():
    assert check_messages([{"role": "user", "content": "hi", "name": "x"}]) == [{"role": "user", "content": "hi"}]
    with pytest.raises(LlmcadError, match="expected a JSON list"):
        check_messages("hi")


def test_commands_usage_unknown_help_and_exit(engine):
    conversation = engine.conversation()
    out, err = chat(conversation, "/frobnicate\n/save\n/stats\n/help\n/exit\nnever answered\n")
    lines = err.splitlines()
    assert lines[0] == "llmcad: error: unknown command /frobnicate (/help lists the commands)"
    assert lines[1] == "llmcad: error: usage: /save FILE"
    assert len(lines) == 2
    assert out == "no answer yet\n" + HELP + "\n"
    assert conversation.messages == []  # /exit stopped before the last line
    assert '"""' in HELP and "\\" in HELP and "/reset" in HELP and "/load FILE" in HELP


def test_multi_line_input(engine):
    conversation = engine.conversation()
    text = 'first line \\\nsecond line\n"""\nblock line\n/not a command\n\n"""\n  \nlast\n'
    options = dict(max_tokens=2, temperature=0.0)
    chat(conversation, text, options)
    users = [m["content"] for m in conversation.messages if m["role"] == "user"]
    assert users == ["first line \nsecond line", "block line\n/not a command\n", "last"]  # blank lines send nothing
    assert conversation.messages == uncached_turns(engine, [], users, options)


def test_input_ending_inside_a_message_sends_it(engine):
    conversation = engine.conversation()
    chat(conversation, 'hello \\\nworld', dict(max_tokens=2))
    assert conversation.messages[0] == {"role": "user", "content": "hello \nworld"}


def test_context_full_is_one_error_line_and_history_unchanged(engine):
    conversation = engine.conversation()
    out, err = chat(conversation, "hello world\n" + "The quick brown fox " * 300 + "\ndef add(a, b):\n")
    assert err.count("\n") == 1 and err.startswith("llmcad: error: ") and "context window" in err and "/reset" in err, err
    expected = uncached_turns(engine, [], ["hello world", "def add(a, b):"])
    assert conversation.messages == expected
    assert out == "".join(a + "\n" for a in answers(expected))


def test_max_tokens_is_cut_to_the_room_left(engine):
    conversation = engine.conversation()
    out, err = chat(conversation, "hello world\n", dict(max_tokens=100_000, temperature=0.0))
    assert err == ""
    room = engine.max_context - len(engine.chat_prompt(conversation.messages[:1]))
    assert conversation.messages == uncached_turns(engine, [], ["hello world"], dict(max_tokens=room, temperature=0.0))


class Interrupts:
    """Ctrl-C during the answer to `message`, after `after` pieces: raised by the stream
    itself (as while the engine computes) or by the output (as while the chat prints)."""

    def __init__(self, conversation, message: str, after: int, where: str):
        self.message, self.after, self.where, self.fired = message, after, where, False
        self.current = None
        stream = conversation.stream

        def interrupted_stream(text, **options):
            self.current = text
            for i, piece in enumerate(stream(text, **options)):
                if where == "stream" and text == message and i == after:
                    self.fired = True
                    raise KeyboardInterrupt
                yield piece

        conversation.stream = interrupted_stream
        self.writes = 0
        interrupts = self

        class Output(io.StringIO):
            def write(self, s):
                if where == "output" and interrupts.current == message and not interrupts.fired:
                    interrupts.writes += 1
                    if interrupts.writes > after:
                        interrupts.fired = True
                        raise KeyboardInterrupt
                return super().write(s)

        self.output = Output()


@pytest.mark.parametrize("where", ["stream", "output"])
def test_ctrl_c_mid_answer_returns_to_the_prompt_and_the_cache_stays_exact(any_engine, where):
    conversation = any_engine.conversation()
    options = dict(max_tokens=16, temperature=0.0, ignore_eos=True)  # long enough to be cut
    interrupts = Interrupts(conversation, "The quick brown fox", 3, where)
    out, err = chat(conversation, "".join(m + "\n" for m in MESSAGES) + "/stats\n", options, output=interrupts.output)
    assert interrupts.fired
    assert "[stopped]" in err and "llmcad: error" not in err
    assert any(line.startswith("answer:") for line in out.splitlines())  # /stats: the turn after the cut one finished
    messages = conversation.messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    full = uncached_turns(any_engine, [], MESSAGES[:2], options)
    # the cut answer is what was streamed before Ctrl-C: the start of the full one
    assert messages[:2] == full[:2]
    assert full[3]["content"].startswith(messages[3]["content"]) and messages[3]["content"] != full[3]["content"]
    # the turn after it is what an uncached run over the recorded history answers
    assert messages == uncached_turns(any_engine, messages[:4], MESSAGES[2:], options)


def test_ctrl_c_at_the_prompt_drops_the_message(engine):
    class CtrlC(io.StringIO):
        def readline(self, *args):
            line = super().readline(*args)
            if line == "^C\n":  # pressed on a continuation line: the message typed so far goes
                raise KeyboardInterrupt
            return line

    conversation = engine.conversation()
    out, err = io.StringIO(), io.StringIO()
    run_chat(conversation, CtrlC("dropped \\\n^C\nhello world\n"), out, False, GREEDY, errors=err)
    assert err.getvalue() == "(/exit or Ctrl-D quits)\n"
    assert conversation.messages == uncached_turns(engine, [], ["hello world"])
    assert out.getvalue() == "\n" + conversation.messages[-1]["content"] + "\n"


def test_interactive_prompts_banner_and_stats_line(engine):
    conversation = engine.conversation()
    out, err = io.StringIO(), io.StringIO()
    run_chat(conversation, io.StringIO('hello \\\nworld\n'), out, True, GREEDY, errors=err, banner="llmcad chat: tiny")
    answer = conversation.messages[-1]["content"]
    assert out.getvalue() == ">>> ... " + answer + "\n>>> \n"
    lines = err.getvalue().splitlines()
    assert lines[0] == "llmcad chat: tiny" and "/help" in lines[1]
    assert lines[2].startswith("[") and "tok/s" in lines[2] and "cached" in lines[2]


def test_chat_command_answers_two_piped_lines(engine, tiny_llama, tmp_path):
    env = {**os.environ, "LLMCAD_HOME": str(tmp_path), "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "llmcad.cli", "chat", "--target", str(tiny_llama), "--precision", "fp32", "--max-tokens", "8"]
    result = subprocess.run(cmd, input=b"hello world\nThe quick brown fox\n", capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected = uncached_turns(engine, [], ["hello world", "The quick brown fox"], dict(max_tokens=8, temperature=0.0))
    assert result.stdout.decode("utf-8") == "".join(a + "\n" for a in answers(expected))
    assert b">>>" not in result.stdout and b"/help" not in result.stderr  # no prompt, no banner on a pipe
