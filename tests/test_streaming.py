"""Replies printed as they come: the same text ``generate`` returns, held back where more
tokens could still change it, and Ctrl-C stops one reply, not the chat."""

from __future__ import annotations

import pytest

from instruct.chat import chat_loop, read_message
from instruct.data.templates import stop_tokens
from instruct.decoding import generate
from instruct.streaming import Printer, stream_reply
from tests.test_generate import GREEDY, instructions
from tests.test_generate import chatty as chatty  # a fixture, shared


class PieceTokenizer:
    """Decodes id ``i`` as ``pieces[i]``: a tokenizer whose pieces the test chooses."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=False) -> str:
        return "".join(self.pieces[i] for i in ids)


def printed(pieces: list[str], stops: list[str], stop_ids=()) -> tuple[list[str], list[str]]:
    """What a Printer writes after each id of ``pieces`` in turn, then at the end."""
    tokenizer, written = PieceTokenizer(pieces), []
    printer = Printer(tokenizer, list(stop_ids), stops, written.append)
    seen = []
    for i in range(len(pieces)):
        printer.update(list(range(i + 1)))
        seen.append("".join(written))
    from instruct.decoding import reply_text

    printer.finish(reply_text(list(range(len(pieces))), tokenizer, list(stop_ids), stops))
    return seen, written


def test_a_stop_string_split_over_tokens_is_never_printed():
    seen, written = printed([" Hi", " there", "</", "s", "> tail"], ["</s>"])
    assert seen == ["Hi", "Hi there", "Hi there", "Hi there", "Hi there"]
    assert "".join(written) == "Hi there"
    # A tail that only looked like the start of a stop string is printed once it is not.
    seen, written = printed(["a", "<", "/", "b"], ["</s>"])
    assert seen == ["a", "a", "a", "a</b"] and "".join(written) == "a</b"


def test_unfinished_characters_and_trailing_space_wait_for_what_follows():
    seen, written = printed(["Caf", "\ufffd", "é", "  ", "!", "  "], [])
    assert seen == ["Caf", "Caf", "Caf" + "\ufffdé", "Caf\ufffdé", "Caf\ufffdé  !", "Caf\ufffdé  !"]
    assert "".join(written) == "Caf\ufffdé  !"  # exactly the stripped reply


def test_the_streamed_reply_is_the_reply_generate_gives(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)[:12]
    expected = generate(model, tokenizer, template, conversations, GREEDY)
    for conversation, reply in zip(conversations, expected, strict=True):
        pieces: list[str] = []
        streamed = stream_reply(model, tokenizer, template, conversation, GREEDY, pieces.append)
        assert streamed.text == reply == "".join(pieces)
        assert not streamed.interrupted and streamed.tokens >= 1 and streamed.seconds > 0
        if len(reply) > 20:
            assert len(pieces) > 3  # it came in pieces, not at the end


def test_with_a_stop_string_the_screen_never_shows_it(chatty):
    model, tokenizer, template = chatty
    conversations = instructions(template)[:16]
    longest = max(generate(model, tokenizer, template, conversations, GREEDY), key=len)
    ids = tokenizer(longest, add_special_tokens=False).input_ids
    cut = template.copy()
    cut.end_of_turn = tokenizer.decode(ids[len(ids) // 2 : len(ids) // 2 + 2])
    stop = stop_tokens(cut, tokenizer)[1][0]
    cut_short = 0
    for conversation in conversations:  # one at a time, as chat and generate ask
        (reply,) = generate(model, tokenizer, cut, [conversation], GREEDY)
        pieces: list[str] = []
        streamed = stream_reply(model, tokenizer, cut, conversation, GREEDY, pieces.append)
        assert streamed.text == reply == "".join(pieces) and stop not in "".join(pieces)
        cut_short += streamed.tokens < GREEDY.max_new_tokens and streamed.tokens > 1
    assert cut_short >= 1


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(chatty):
    model, tokenizer, template = chatty
    asked = instructions(template)[:12]
    replies = generate(model, tokenizer, template, asked, GREEDY)
    longest = max(range(len(asked)), key=lambda i: len(replies[i]))
    question = asked[longest][-1]["content"]
    lines = iter([question, question, "/exit"])
    pieces: list[str] = []
    stopped = []

    def stream(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3 and not stopped:  # a few pieces into the first reply
            stopped.append(True)
            raise KeyboardInterrupt

    shown: list[str] = []
    history = chat_loop(model, tokenizer, template, GREEDY, read=lambda _: next(lines),
                        write=shown.append, stream=stream)  # fmt: skip
    full = generate(model, tokenizer, template, [[{"role": "user", "content": question}]],
                    GREEDY)[0]  # fmt: skip
    first, second = history[1]["content"], history[3]["content"]
    assert len(first) < len(full) and full.startswith(first)  # cut where Ctrl-C came
    assert shown[0].endswith("stopped)") and "tokens/s" in shown[0]
    assert "stopped" not in shown[1] and second  # the next turn is answered in full
    screen = "".join(pieces)
    assert screen.startswith(f"assistant> {first}\nassistant> ")


def test_system_sets_the_system_prompt_and_keeps_the_conversation(chatty):
    model, tokenizer, template = chatty
    lines = iter(["Hello there", "/system Be brief.", "And again", "/system", "/exit"])
    shown: list[str] = []
    history = chat_loop(model, tokenizer, template, GREEDY, system="Be kind.",
                        read=lambda _: next(lines), write=shown.append,
                        stream=lambda _: None)  # fmt: skip
    assert "(system prompt: Be brief.)" in shown and "(no system prompt)" in shown
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


def test_messages_of_several_lines():
    def reader(*lines: str):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader("one line")) == "one line"
    assert read_message(reader("first \\", "second\\", "third")) == "first \nsecond\nthird"
    block = read_message(reader('"""', "def f():", "    return 1", '"""', "never read"))
    assert block == "def f():\n    return 1"
    assert read_message(reader('"""inline', 'more"""')) == "inline\nmore"
    with pytest.raises(EOFError):
        read_message(lambda prompt: (_ for _ in ()).throw(EOFError))
