"""NIP-90 kind 5050 parsing and the feedback/result events, without I/O."""

from __future__ import annotations

import json

import pytest

from nodeprov.protocol import nip04, nip90
from nodeprov.protocol.nostr_event import Event, EventTemplate, Keys, sign_event

NODE = Keys.generate()
CUSTOMER = Keys.generate()


def request(*tags: tuple[str, ...], content: str = "", to: str = NODE.public_key) -> Event:
    return sign_event(EventTemplate(5050, (("p", to), *tags), content), CUSTOMER.secret_key)


def parse(event: Event) -> nip90.JobRequest:
    return nip90.parse_request(
        event, NODE.public_key, lambda c: nip04.decrypt(c, NODE.secret_key, event.pubkey)
    )


def test_text_input_and_params_become_a_chat_body() -> None:
    event = request(
        ("i", "What is the capital of France?", "text"),
        ("param", "model", "fake-chat"),
        ("param", "max_tokens", "64"),
        ("param", "temperature", "0.5"),
        ("param", "top-k", "50"),  # not an OpenAI option: ignored
        ("bid", "20000"),
        ("cashu", "cashuBxyz"),
    )
    job = parse(event)
    assert job.bid_msat == 20_000 and job.cashu == "cashuBxyz" and not job.encrypted
    assert job.customer == CUSTOMER.public_key and job.id == event.id
    assert job.chat_body("default") == {
        "model": "fake-chat",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 64,
        "temperature": 0.5,
    }


def test_the_kinds_own_example_prompt_input_and_hyphenated_params() -> None:
    prompt = ("i", "what is the capital of France? ", "prompt")
    job = parse(request(prompt, ("param", "top-p", "0.7"), ("param", "frequency_penalty", "1")))
    body = job.chat_body("m")
    assert body["messages"][0]["content"] == "what is the capital of France? "
    assert body["top_p"] == 0.7 and body["frequency_penalty"] == 1.0


def test_default_model_and_several_inputs_joined() -> None:
    job = parse(request(("i", "one", "text"), ("i", "two")))
    body = job.chat_body("the-default")
    assert body["model"] == "the-default" and "max_tokens" not in body
    assert body["messages"][0]["content"] == "one\n\ntwo"


CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def test_a_messages_input_is_the_conversation_and_a_text_input_its_next_turn() -> None:
    """An ``i`` tag marked ``messages`` (NIP-90's marker: how the job uses an input) carries
    a JSON array of chat messages; a text input after it is the user's next message."""
    job = parse(
        request(
            ("i", json.dumps(CONVERSATION), "text", "", "messages"),
            ("i", "And of Italy?", "text"),
            ("param", "system", "Be brief."),
        )
    )
    assert job.chat_body("m")["messages"] == [
        {"role": "system", "content": "Be brief."},
        *CONVERSATION,
        {"role": "user", "content": "And of Italy?"},
    ]
    alone = parse(request(("i", json.dumps(CONVERSATION[:2]), "text", "", "messages")))
    assert alone.chat_body("m")["messages"] == CONVERSATION[:2]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("not json", "JSON array"),
        ('{"role": "user"}', "JSON array"),
        ("[]", "no text input"),
        ('[{"role": "tool", "content": "x"}]', "role"),
        ('[{"role": "user", "content": 5}]', "content"),
        ('[{"role": "user"}]', "content"),
    ],
)
def test_a_bad_messages_input_is_refused_with_a_reason(data: str, says: str) -> None:
    with pytest.raises(nip90.InvalidJobRequest, match=says):
        parse(request(("i", data, "text", "", "messages")))


@pytest.mark.parametrize(
    ("tags", "says"),
    [
        ((), "no text input"),
        ((("i", "https://x", "url"),), "input type 'url'"),
        ((("i", "hi", "text"), ("param", "max_tokens", "many")), "whole number"),
        ((("i", "hi", "text"), ("param", "max_tokens", "0")), "between"),
        ((("i", "hi", "text"), ("param", "temperature", "nan")), "between"),
        ((("i", "hi", "text"), ("bid", "-5")), "between"),
        ((("i", "hi", "text"), ("bid", "1.5")), "whole number"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    tags: tuple[tuple[str, ...], ...], says: str
) -> None:
    with pytest.raises(nip90.InvalidJobRequest, match=says):
        parse(request(*tags))


def test_a_request_for_another_provider_is_refused() -> None:
    with pytest.raises(nip90.InvalidJobRequest, match="'p' tag"):
        parse(request(("i", "hi", "text"), to=Keys.generate().public_key))


def test_encrypted_params_are_read_from_the_content() -> None:
    private = [["i", "a secret question", "text"], ["param", "max_tokens", "9"]]
    content = nip04.encrypt(json.dumps(private), CUSTOMER.secret_key, NODE.public_key)
    event = request(("encrypted",), ("bid", "5000"), content=content)
    job = parse(event)
    assert job.encrypted and job.prompt == "a secret question" and job.max_tokens == 9
    # Only the customer and the node can read the answer; the inputs are not repeated.
    result = nip90.result(
        event, "the answer", 1234,
        encrypt=lambda t: nip04.encrypt(t, NODE.secret_key, CUSTOMER.public_key),
    )  # fmt: skip
    assert ("encrypted",) in result.tags and not [t for t in result.tags if t[0] == "i"]
    assert nip04.decrypt(result.content, CUSTOMER.secret_key, NODE.public_key) == "the answer"


def test_undecryptable_params_are_refused() -> None:
    with pytest.raises(nip90.InvalidJobRequest, match="decrypt"):
        parse(request(("encrypted",), content="bm9wZQ==?iv=AAAAAAAAAAAAAAAAAAAAAA=="))
    with pytest.raises(nip90.InvalidJobRequest, match="not accepted"):
        nip90.parse_request(request(("encrypted",), content="x"), NODE.public_key)


def test_result_carries_request_inputs_amount_and_text() -> None:
    event = request(("i", "hi", "text"), ("param", "model", "m"))
    result = nip90.result(event, "hello", 4321)
    assert result.kind == 6050 and result.content == "hello"
    tags = {t[0]: t[1:] for t in result.tags}
    assert json.loads(tags["request"][0]) == event.to_dict()
    assert tags["e"] == (event.id,) and tags["p"] == (CUSTOMER.public_key,)
    assert tags["i"] == ("hi", "text") and tags["amount"] == ("4321",)


def test_feedback_statuses() -> None:
    event = request(("i", "hi", "text"))
    unpaid = nip90.feedback(event, "payment-required", "pay", amount_msat=2100, bolt11="lnbc1")
    assert unpaid.kind == 7000
    assert ("status", "payment-required", "pay") in unpaid.tags
    assert ("amount", "2100", "lnbc1") in unpaid.tags
    assert ("e", event.id) in unpaid.tags and ("p", CUSTOMER.public_key) in unpaid.tags
    assert ("status", "processing") in nip90.feedback(event, "processing").tags


def test_answer_text_of_a_chat_completion() -> None:
    assert nip90.answer_text({"choices": [{"message": {"content": "x"}}]}) == "x"
    assert nip90.answer_text({"choices": []}) == ""
