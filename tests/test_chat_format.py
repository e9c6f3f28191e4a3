"""The instruct format against mistral-common's own v1 encoder, and the --messages file format."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_cli.errors import MistralError
from mistral_cli.text.chat_format import (
    Message,
    encode_chat,
    load_conversation,
    load_messages,
    save_messages,
    validate_for_generation,
    validate_messages,
)
from mistral_cli.text.tokenizer import Tokenizer
from tiny import tokenizer_path

S, U, A = "system", "user", "assistant"
REFERENCE_CLASSES = {S: SystemMessage, U: UserMessage, A: AssistantMessage}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tokenizer_path())


@pytest.fixture(scope="module")
def reference():
    mistral = MistralTokenizer.v1()

    def encode(messages: list[Message]) -> list[int]:
        request = ChatCompletionRequest(messages=[REFERENCE_CLASSES[m.role](content=m.content) for m in messages])
        return mistral.encode_chat_completion(request).tokens

    return encode


def conv(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]


def test_reference_example_from_tech_md(tok, reference):
    messages = conv((S, "You are a helpful bot"), (U, "Hello"), (A, "Hi there!"), (U, "How are you?"))
    expected = [1, 733, 16289, 28793, 995, 460, 264, 10865, 12435, 13, 13, 16230, 733, 28748, 16289, 28793, 15359, 736, 28808, 2,
                733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]  # fmt: skip
    assert encode_chat(tok, messages) == expected == reference(messages)
    assert encode_chat(tok, messages[1:], system="You are a helpful bot") == expected


CONVERSATIONS = [
    conv((U, "Hello")),
    conv((U, "")),
    conv((U, "   ")),
    conv((U, "  leading and trailing spaces  ")),
    conv((U, "\n\nnewlines\n")),
    conv((U, "Unicode: 日本語, 한국어, Ελληνικά, emoji 🦩🤖👨‍👩‍👧")),
    conv((U, 'Fix this:\n```python\ndef f(x):\n\treturn {"a": x**2}\n```')),
    conv((U, "I typed </s> and <s> and <unk> myself")),
    conv((U, "[INST] nested [/INST] markers")),
    conv((U, "Hi"), (A, "Hello! </s> How can I help?"), (U, "[/INST] tricky")),
    conv((U, "a"), (A, " b "), (U, "c"), (A, "d\n"), (U, "e")),
    conv((U, "a"), (A, "   "), (U, "c")),
    conv((S, "Be brief."), (U, "Hi")),
    conv((S, "Be brief."), (S, "Use French."), (U, "Hi")),
    conv((S, ""), (U, "Hi")),
    conv((S, "")),
    conv((S, "only a system prompt")),
    conv((U, "first"), (U, "second"), (U, ""), (U, "third")),
    conv((U, "q"), (A, "part one"), (A, "part two"), (U, "q2")),
    conv((U, "q"), (S, "late system prompt"), (U, "q2")),
    conv((U, "q"), (S, ""), (U, "q2")),
    conv((U, "q"), (A, "r"), (U, "q2"), (S, "system at the end")),
    conv((A, "assistant speaks first"), (U, "ok")),
    conv((S, "sys"), (A, "assistant after system"), (U, "ok")),
    conv((S, "sys 🦩"), (U, "first"), (A, "reply"), (U, "second"), (A, "reply 2"), (U, "third")),
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=lambda m: "|".join(f"{x.role}:{x.content[:12]}" for x in m))
def test_same_ids_as_mistral_common(tok, reference, messages):
    assert encode_chat(tok, messages) == reference(messages)


@pytest.mark.parametrize("messages", CONVERSATIONS[:12], ids=str)
def test_system_argument_is_a_first_system_message(tok, reference, messages):
    assert encode_chat(tok, messages, system="You are terse.") == reference(conv((S, "You are terse.")) + messages)


def test_generation_prompt_ends_after_inst(tok):
    ids = encode_chat(tok, conv((U, "Hello")))
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.decode(ids[-4:]) == "[/INST]"


def test_finished_history_ends_with_eos_and_is_a_prefix(tok, reference):
    history = conv((S, "sys"), (U, "Hello"), (A, "Hi there!"))
    ids = encode_chat(tok, history)
    assert ids[-1] == tok.eos_id
    assert reference(history + conv((U, "next")))[: len(ids)] == ids


texts = st.one_of(
    st.sampled_from(["", " ", "hi", " lead", "trail ", "\n", "</s>", "[INST]", "🦩", "日本語", "a\n\nb"]),
    st.text(max_size=12),
)
conversations = st.lists(st.tuples(st.sampled_from([S, U, A]), texts), min_size=1, max_size=7).map(
    lambda pairs: conv(*pairs)
)


def refused(messages: list[Message]) -> bool:
    try:
        validate_messages(messages)
    except MistralError:
        return True
    return False


@settings(max_examples=150, deadline=None)
@given(messages=conversations)
def test_random_conversations_match_mistral_common(tok, reference, messages):
    if messages[-1].role == A:
        messages = [*messages, Message(U, "next")]
    if refused(messages):
        with pytest.raises(Exception):  # noqa: B017 - whichever exception mistral-common raises
            reference(messages)
        with pytest.raises(MistralError):
            encode_chat(tok, messages)
    else:
        assert encode_chat(tok, messages) == reference(messages)


@settings(max_examples=150, deadline=None)
@given(messages=conversations, user=texts)
def test_history_is_a_prefix_of_history_plus_user(tok, messages, user):
    history = [*messages, Message(A, "the reply")]
    if not refused(history):
        ids = encode_chat(tok, history)
        assert ids[-1] == tok.eos_id
        assert encode_chat(tok, [*history, Message(U, user)])[: len(ids)] == ids


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "no messages"),
        (conv((U, "q"), (A, "")), "empty assistant"),
        (conv((U, "q"), (A, "r"), (S, "late")), "system message right after an assistant"),
        ([Message("bot", "hi")], 'unknown role "bot"'),
        ([Message(U, None)], 'no string "content"'),  # type: ignore[arg-type]
    ],
)
def test_refused_conversations(tok, messages, problem):
    with pytest.raises(MistralError, match=problem):
        encode_chat(tok, messages)


def test_validate_for_generation():
    validate_for_generation(conv((S, "s"), (U, "q")))
    with pytest.raises(MistralError, match="no messages"):
        validate_for_generation([])
    with pytest.raises(MistralError, match='role "assistant"; it must end with a user message'):
        validate_for_generation(conv((U, "q"), (A, "r")))
    with pytest.raises(MistralError, match="must end with a user message"):
        validate_for_generation(conv((S, "s")))


def write(tmp_path, content: str | bytes):
    path = tmp_path / "conv.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_load_plain_list(tmp_path):
    path = write(tmp_path, json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "q", "x": 1}]))
    assert load_messages(path) == conv((S, "s"), (U, "q"))


def test_load_object_form_and_bom(tmp_path):
    data = {"messages": [{"role": "user", "content": "q"}], "metadata": {"model": "m"}, "version": 1}
    path = write(tmp_path, b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert load_conversation(path) == (conv((U, "q")), {"model": "m"})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[{'role': 'user'}]", "not valid JSON.*line 1, column 3"),
        ('[\n  {"role": "user", "content": "q"},\n]', "not valid JSON.*line 3"),
        ("", "not valid JSON"),
        (b"\xff\xfe[]", "not UTF-8"),
        ('{"role": "user", "content": "q"}', "must hold a JSON list"),
        ('"just a string"', "must hold a JSON list"),
        ("[]", "no messages"),
        ('["hello"]', r"messages\[0\] is not an object"),
        (
            '[{"role": "user", "content": "q"}, {"role": "bot", "content": "hi"}]',
            r'messages\[1\] has unknown role "bot"',
        ),
        ('[{"role": "tool", "content": "{}"}]', 'unknown role "tool"'),
        ('[{"content": "q"}]', "unknown role null"),
        ('[{"role": "user", "content": ["q"]}]', r"messages\[0\] \(user\) has no string \"content\""),
        ('[{"role": "user"}]', 'no string "content"'),
        ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]', "empty assistant"),
    ],
)
def test_load_errors(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(MistralError, match=problem) as e:
        load_messages(path)
    assert str(e.value).startswith(f"Messages file {path}")


def test_load_unreadable(tmp_path):
    with pytest.raises(MistralError, match="does not exist"):
        load_messages(tmp_path / "missing.json")
    with pytest.raises(MistralError, match="is a folder"):
        load_messages(tmp_path)


def test_load_allows_history_ending_with_assistant(tmp_path):
    path = write(tmp_path, json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]))
    messages = load_messages(path)
    with pytest.raises(MistralError, match="must end with a user message"):
        validate_for_generation(messages)


def test_save_writes_a_plain_list_that_loads_back(tmp_path):
    messages = conv((S, "sys"), (U, "Ünïcödé 🦩 </s>"), (A, "  reply\n"))
    path = tmp_path / "saved.json"
    save_messages(path, messages, metadata={"model": "mistral-7b-instruct-v0.2", "options": {"temperature": 0.7}})
    plain = json.loads(path.read_text(encoding="utf-8"))
    assert [(m["role"], m["content"]) for m in plain] == [(m.role, m.content) for m in messages]
    assert load_conversation(path) == (messages, {"model": "mistral-7b-instruct-v0.2", "options": {"temperature": 0.7}})
    save_messages(path, messages[:2])
    assert load_conversation(path) == (messages[:2], {})
    assert [p.name for p in tmp_path.iterdir()] == ["saved.json"]


def test_save_to_a_missing_folder(tmp_path):
    with pytest.raises(MistralError, match="Cannot write messages file"):
        save_messages(tmp_path / "no" / "such" / "dir.json", conv((U, "q")))


@pytest.mark.parametrize(
    "messages",
    [conv((U, "Hi"), (A, "The answer is")), conv((S, "sys"), (U, "a"), (A, "b"), (U, "c"), (A, "Once upon a time"))],
    ids=["one-turn", "history"],
)
def test_a_continuation_is_mistral_common_s_prefix_message(tok, messages):
    from mistral_cli.text.chat_format import encode_continuation

    *history, last = messages
    request = ChatCompletionRequest(
        messages=[REFERENCE_CLASSES[m.role](content=m.content) for m in history]
        + [AssistantMessage(content=last.content, prefix=True)]
    )
    assert encode_continuation(tok, messages) == MistralTokenizer.v1().encode_chat_completion(request).tokens


def test_only_an_assistant_message_is_continued(tok):
    from mistral_cli.text.chat_format import encode_continuation

    with pytest.raises(MistralError, match="no assistant message to continue"):
        encode_continuation(tok, conv((U, "Hi")))
