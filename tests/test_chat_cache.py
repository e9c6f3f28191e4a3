"""Cache reuse across chat turns: the same logits as a fresh prefill, and only the new tokens fed."""

from __future__ import annotations

import pytest
import torch

from mistral_cli.engine.engine import Done, Engine
from mistral_cli.engine.load import load_engine
from mistral_cli.options import GenerationOptions, LoadOptions
from mistral_cli.text.conversation import Conversation

BIG = 1024
GREEDY = GenerationOptions(max_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def engine(hf_model_dir) -> Engine:
    return load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="fp32", max_context=1024))


def fresh(engine: Engine) -> Engine:
    """The same weights with an empty cache."""
    return Engine(engine.model, engine.tokenizer, engine.placement, engine.max_context)


def reply(engine: Engine, ids: list[int]) -> Done:
    return [e for e in engine.generate(ids, GREEDY) if isinstance(e, Done)][0]


def check_turn(engine: Engine, ids: list[int]) -> int:
    """Prefill `ids` on the chat's engine; its logits must equal a fresh full prefill. Returns the tokens fed."""
    logits, fed = engine.prefill(ids)
    assert engine.tokens == ids  # the cache holds exactly the instruct-format ids of the history
    reference, all_fed = fresh(engine).prefill(ids)
    assert all_fed == len(ids)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    return fed


def answer(engine: Engine, conv: Conversation, ids: list[int]) -> Done:
    done = reply(engine, ids)
    assert done.text == reply(fresh(engine), ids).text  # the reply itself is the same as without reuse
    conv.answer(done.text, done.finish_reason, done.tokens)  # as the chat does: the sampled ids are kept
    return done


MESSAGES = ["Hello", "What is 2+2?", "Tell me a story", "Why?", "Go on"]


def test_each_turn_feeds_only_its_new_tokens(engine):
    engine.reset()
    conv = Conversation(engine.tokenizer, "Be brief.")
    for i, message in enumerate(MESSAGES):
        prompt = conv.ask(message, BIG, 100)
        held = list(engine.tokens)
        assert prompt.ids[: len(held)] == held  # nothing the cache holds is stale
        fed = check_turn(engine, prompt.ids)
        assert fed == len(prompt.ids) - len(held)
        if i:  # the last reply token and its EOS (never fed while generating), then the new user turn
            new_turn = engine.tokenizer.encode(f"[INST] {message} [/INST]")
            assert fed == 2 + len(new_turn)
        answer(engine, conv, prompt.ids)


def test_undo_retry_system_and_dropping_rebuild_the_cache_correctly(engine):
    engine.reset()
    tok = engine.tokenizer
    conv = Conversation(tok)
    for message in MESSAGES[:2]:
        ids = conv.ask(message, BIG, 100).ids
        check_turn(engine, ids)
        answer(engine, conv, ids)

    # /retry: the same prompt again; nothing is fed (the logits of its last token are the ones it had)
    ids = conv.retry(BIG, 100).ids
    assert check_turn(engine, ids) == 0
    answer(engine, conv, ids)

    # /undo, then a new message: the cache is cut back to the history before the undone exchange
    conv.undo()
    ids = conv.ask("Something else", BIG, 100).ids
    assert check_turn(engine, ids) <= len(tok.encode("[INST] Something else [/INST]"))
    answer(engine, conv, ids)

    # a reply whose sampled ids are not what its text encodes to: the history keeps the sampled ids, so the cache
    # stays whole (re-encoding the text would cut it where the ids differ and read the reply again)
    prompt_ids = conv.ask("Say hello", BIG, 100).ids
    check_turn(engine, prompt_ids)
    pieces = {tok.piece(i): i for i in range(tok.vocab_size)}
    generated = [pieces["▁Hel"], pieces["lo"]]  # as a model may spell it; "Hello" re-encodes as "▁Hello"
    assert tok.decode(generated) == "Hello" and tok.encode("Hello") != generated
    engine.prefill(prompt_ids + generated)
    conv.answer("Hello", "stop", generated)
    ids = conv.ask("Another one?", BIG, 100).ids
    assert ids[: len(prompt_ids) + 2] == prompt_ids + generated
    assert check_turn(engine, ids) == len(ids) - len(prompt_ids) - len(generated)
    answer(engine, conv, ids)

    # ids that are not the text (a stop string cut from it) are not kept: the text is encoded
    conv.undo()
    conv.undo()
    prompt_ids = conv.ask("Say hello", BIG, 100).ids
    conv.answer("Hel", "stop_sequence", generated)
    assert conv.exchanges[-1].reply_ids is None
    assert conv.ids() == prompt_ids + tok.encode("Hel") + [tok.eos_id]
    ids = conv.ask("Another one?", BIG, 100).ids
    check_turn(engine, ids)
    answer(engine, conv, ids)

    # /system mid-conversation changes the first turn: read again from the system prompt on
    conv.system = "You are a pirate."
    inst = 1 + len(tok.encode("[INST]"))  # BOS and "[INST]" start every history
    ids = conv.ask("Ahoy?", BIG, 100).ids
    assert check_turn(engine, ids) == len(ids) - inst
    answer(engine, conv, ids)

    # dropping the oldest exchanges to fit: the first turn keeps the system prompt, the rest is read again
    small = len(conv.ids()) - 10
    prompt = conv.ask("Last one", small, 20)
    assert prompt.dropped
    system_turn = [tok.bos_id, *tok.encode("[INST] You are a pirate.\n\n")]
    assert prompt.ids[: len(system_turn)] == system_turn
    assert check_turn(engine, prompt.ids) == len(prompt.ids) - len(system_turn)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_the_same_prompt_again_gives_the_same_logits_and_reply(hf_model_dir, quantize):
    """A prompt asked again on one engine (a retry, a repeated request to the server) gives the logits it gave the
    first time, bit for bit, so a greedy reply repeats: feeding its last token alone would take another product path
    (one row instead of the prompt's rows: int8 on torch's kernel instead of dequantized), which rounds otherwise."""
    engine = load_engine(hf_model_dir, LoadOptions(device="cpu", dtype="bf16", quantize=quantize, max_context=256))
    ids = [1, *torch.randint(3, 32000, (23,), generator=torch.Generator().manual_seed(4)).tolist()]
    first, fed = engine.prefill(ids)
    assert fed == len(ids)
    before = reply(engine, ids)  # the cache now holds the reply too
    again, fed = engine.prefill(ids)
    assert fed == 0 and torch.equal(again, first) and engine.tokens == ids and engine.cache.length == len(ids)
    assert reply(engine, ids).tokens == before.tokens
    other = [*ids[:-1], ids[-1] + 1]  # another prompt of the same length is computed, not taken for it
    logits, fed = engine.prefill(other)
    assert fed == 1 and not torch.equal(logits, first)
    engine.prefill(ids)
    _, fed = engine.prefill(ids[:-3])  # a prefix of it: its own last logits are computed
    assert fed == 1
