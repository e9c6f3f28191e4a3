"""Chat history logic without a terminal or a network: encoding, fitting, undo, retry, save and load."""

import json

import pytest

from mistral_cli.errors import MistralError
from mistral_cli.text.chat_format import Message, encode_chat, load_messages, validate_messages
from mistral_cli.text.conversation import DEFAULT_REPLY_ROOM, Conversation, Exchange, reply_room
from mistral_cli.text.tokenizer import Tokenizer
from tiny import tokenizer_path

BIG = 32768


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tokenizer_path())


def chat(tok, system=None, turns=()) -> Conversation:
    conv = Conversation(tok, system)
    for user, reply in turns:
        conv.ask(user, BIG, 100)
        conv.answer(reply, "stop")
    return conv


def is_prefix(a: list[int], b: list[int]) -> bool:
    return b[: len(a)] == a


def test_ids_are_the_instruct_format_and_grow_by_prefix(tok):
    conv = Conversation(tok, "Be terse.")
    assert conv.tokens_used() == len(encode_chat(tok, [Message("user", "")], system="Be terse."))
    history = conv.ids()
    for user, reply in [("Hello", "Hi there!"), ("How are you?", "Fine."), ("Bye 👋", "Bye.")]:
        prompt = conv.ask(user, BIG, 100)
        expected = encode_chat(tok, [*conv.messages()], system="Be terse.")
        assert prompt.ids == expected == conv.ids()
        assert expected[-4:] == tok.encode(" [/INST]")[-4:]
        assert prompt.dropped == []
        if len(conv.exchanges) > 1:
            assert is_prefix(history, prompt.ids)  # what the cache holds stays valid
        conv.answer(reply, "stop")
        history = conv.ids()
        assert history[-1] == tok.eos_id
        assert conv.tokens_used() == len(history)
    assert Conversation(tok).ids() == [] and Conversation(tok).tokens_used() == 0


def test_reference_example_from_tech_md(tok):
    conv = chat(tok, "You are a helpful bot", [("Hello", "Hi there!")])
    prompt = conv.ask("How are you?", BIG, 100)
    assert prompt.ids == [1, 733, 16289, 28793, 995, 460, 264, 10865, 12435, 13, 13, 16230, 733, 28748, 16289, 28793,
                          15359, 736, 28808, 2, 733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]  # fmt: skip


def test_fitting_drops_oldest_exchanges_and_keeps_the_system_prompt(tok):
    turns = [
        (f"Question number {i} about the weather in Paris?", f"Answer number {i}: sunny and warm.") for i in range(6)
    ]
    conv = chat(tok, "You are a weather bot.", turns)
    per_turn = len(conv.ids()) // 6
    max_context, room = 3 * per_turn + 40, 20
    prompt = conv.ask("And tomorrow?", max_context, room)
    target = max_context - room - max_context // 4  # dropping frees a quarter of the context more than needed
    assert len(prompt.ids) <= target
    assert prompt.dropped == [Exchange(u, r, "stop") for u, r in turns[: len(prompt.dropped)]]
    assert 2 <= len(prompt.dropped) <= 5
    assert conv.archived == prompt.dropped
    kept = turns[len(prompt.dropped) :]
    assert [(e.user, e.reply) for e in conv.exchanges[:-1]] == kept
    assert prompt.ids == encode_chat(tok, conv.messages(), system="You are a weather bot.")
    assert tok.decode(prompt.ids).startswith("[INST] You are a weather bot.\n\n" + kept[0][0])
    # no more than that was dropped: keeping one more exchange would not leave the quarter free
    with_one_more = encode_chat(tok, chat(tok, "You are a weather bot.", turns[len(prompt.dropped) - 1 :]).messages()
                                + [Message("user", "And tomorrow?")], system="You are a weather bot.")  # fmt: skip
    assert len(with_one_more) > target
    assert prompt.dropped_tokens == len(chat(tok, "You are a weather bot.", turns).ids()) + len(
        tok.encode("[INST] And tomorrow? [/INST]")
    ) - len(prompt.ids)
    # /save keeps what was dropped
    assert len(conv.messages(conv.archived + conv.exchanges)) == 13


def test_a_message_too_long_for_the_context_is_refused_with_its_size(tok):
    conv = chat(tok, None, [("Hi", "Hello.")])
    before = conv.ids()
    long = "word " * 300
    size = len(tok.encode(long))
    with pytest.raises(MistralError, match=rf"This message is {size} tokens .*context holds 200 tokens"):
        conv.ask(long, 200, 50)
    assert conv.ids() == before and conv.archived == []
    # a message that fits only without the history and without full reply room: everything else goes
    prompt = conv.ask("word " * 100, 200, 150)
    assert [e.user for e in conv.exchanges] == ["word " * 100] and len(prompt.dropped) == 1
    assert len(prompt.ids) < 200


def test_undo_retry_and_cut_replies(tok):
    conv = chat(tok, None, [("One", "Uno."), ("Two", "Dos.")])
    assert conv.undo() == Exchange("Two", "Dos.", "stop")
    assert [e.user for e in conv.exchanges] == ["One"]
    assert conv.ids() == encode_chat(tok, [Message("user", "One"), Message("assistant", "Uno.")])

    prompt = conv.retry(BIG, 100)
    assert prompt.ids == encode_chat(tok, [Message("user", "One")])
    assert conv.exchanges[-1].reply is None
    conv.answer("Un", "interrupted")
    assert conv.exchanges[-1].cut and not Exchange("x", "y", "stop").cut
    assert conv.ids()[-1] == tok.eos_id  # a cut reply is still a closed turn of the format

    with pytest.raises(MistralError):  # retry that cannot fit restores the reply it would have replaced
        conv.retry(5, 1)
    assert conv.exchanges[-1] == Exchange("One", "Un", "interrupted")

    assert conv.undo() is not None and conv.undo() is None
    with pytest.raises(MistralError, match="no message"):
        conv.retry(BIG, 100)


def test_an_empty_reply_is_left_out_of_the_encoding(tok):
    conv = chat(tok, "Sys", [("First", "")])
    prompt = conv.ask("Second", BIG, 100)
    assert prompt.ids == encode_chat(tok, [Message("user", "First\n\nSecond")], system="Sys")
    conv.answer("Reply.", "stop")
    validate_messages(conv.messages())


def test_clear_keeps_the_system_prompt(tok):
    conv = chat(tok, "Sys", [("a", "b")])
    conv.clear()
    assert conv.exchanges == [] and conv.system == "Sys"


def test_save_load_round_trip(tok, tmp_path):
    conv = chat(tok, "Be kind.", [("Hello", "Hi!"), ("Tell me more", "Well")])
    conv.exchanges[-1].finish = "interrupted"
    conv.archived = [Exchange("Old", "Older.", "stop")]
    path = tmp_path / "chat.json"
    assert conv.save(path, {"model": "tiny", "options": {"temperature": 0.0}}) == 7

    data = json.loads(path.read_text(encoding="utf-8"))
    assert [(m["role"], m["content"]) for m in data] == [
        ("system", "Be kind."), ("user", "Old"), ("assistant", "Older."), ("user", "Hello"), ("assistant", "Hi!"),
        ("user", "Tell me more"), ("assistant", "Well"),
    ]  # fmt: skip
    assert data[0]["metadata"]["model"] == "tiny"
    assert data[0]["metadata"]["cut"] == [{"message": 6, "finish_reason": "interrupted"}]
    assert [m.content for m in load_messages(path)][1] == "Old"  # the plain --messages reader accepts it

    again = Conversation(tok)
    meta = again.load(path)
    assert meta["model"] == "tiny"
    assert again.system == "Be kind."
    assert again.exchanges == [
        Exchange("Old", "Older.", "stop"), Exchange("Hello", "Hi!", "stop"), Exchange("Tell me more", "Well", "interrupted")
    ]  # fmt: skip
    assert again.ids() == conv.ids(conv.archived + conv.exchanges)

    with pytest.raises(MistralError, match="nothing to save"):
        Conversation(tok).save(tmp_path / "empty.json")


@pytest.mark.parametrize(
    "messages",
    [
        [("user", "a"), ("user", "b"), ("assistant", "c"), ("assistant", "d"), ("user", "e")],
        [("assistant", "Hello, I am a bot."), ("user", "Hi")],
        [("system", "S1"), ("user", "a"), ("system", "S2"), ("assistant", "c")],
        [("user", ""), ("user", "x"), ("assistant", "y")],
    ],
)
def test_load_of_any_valid_file_keeps_its_token_ids(tok, tmp_path, messages):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": r, "content": c} for r, c in messages]), encoding="utf-8")
    conv = Conversation(tok, "ignored: the file replaces it")
    conv.load(path)
    assert conv.ids() == encode_chat(tok, [Message(r, c) for r, c in messages])


def test_load_gathers_system_messages_into_the_system_prompt(tok, tmp_path):
    path = tmp_path / "m.json"
    messages = [("system", "S1"), ("user", "a"), ("system", "S2"), ("user", "b"), ("assistant", "c")]
    path.write_text(json.dumps([{"role": r, "content": c} for r, c in messages]), encoding="utf-8")
    conv = Conversation(tok)
    conv.load(path)
    # a system message between two user messages no longer splits them into two turns
    assert conv.system == "S1\n\nS2" and conv.exchanges == [Exchange("a\n\nb", "c", "stop")]


def test_load_ignores_metadata_it_does_not_know(tok, tmp_path):
    path = tmp_path / "m.json"
    messages = [
        {"role": "user", "content": "a", "metadata": {"cut": 5, "other": [1]}},
        {"role": "assistant", "content": "b"},
    ]
    path.write_text(json.dumps(messages), encoding="utf-8")
    conv = Conversation(tok)
    assert conv.load(path)["other"] == [1]
    assert conv.exchanges == [Exchange("a", "b", "stop")]


def test_load_errors_leave_the_conversation_alone(tok, tmp_path):
    conv = chat(tok, None, [("a", "b")])
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(MistralError, match="not valid JSON"):
        conv.load(tmp_path / "bad.json")
    with pytest.raises(MistralError, match="does not exist"):
        conv.load(tmp_path / "missing.json")
    assert conv.exchanges == [Exchange("a", "b", "stop")]


def test_reply_room():
    assert reply_room(None, 32768) == DEFAULT_REPLY_ROOM
    assert reply_room(200, 32768) == 200
    assert reply_room(None, 512) == 256
    assert reply_room(0, 512) == 1
