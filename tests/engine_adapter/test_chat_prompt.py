"""Chat rendering with own answers, and seeded sampling: the pieces the server builds on."""

import pytest
import torch

from engine_adapter import scenarios as sc
from engine_adapter.answers import AnswerBook
from engine_adapter.chat_prompt import render_chat
from engine_adapter.sampling import Sampler


def template_ids(tok, messages):
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


@pytest.mark.parametrize("messages", [sc.few_shot_messages(sc.FEW_SHOT_FINAL_QUESTIONS[0]), sc.chat_messages(2),
                                      sc.doc_messages(sc.DOC_QUESTIONS[0])[:1]])
def test_without_own_answers_it_is_the_template(smollm2, messages):
    tok = smollm2[1]
    r = render_chat(tok, messages, lambda text: None)
    assert r.ids == template_ids(tok, messages) and r.own_answers == 0


def test_an_own_answer_goes_in_as_its_ids(smollm2):
    tok = smollm2[1]
    # Ids that decode to the answer's text but are not what tokenizing the text gives.
    text = "Plant basil."
    ids = [t for piece in ("Pl", "ant", " bas", "il", ".") for t in tok(piece, add_special_tokens=False)["input_ids"]]
    assert tok.decode(ids) == text and ids != tok(text, add_special_tokens=False)["input_ids"]
    book = AnswerBook()
    book.remember("t", text, ids)
    first = [{"role": "user", "content": "What should I grow?"}]
    prompt1 = template_ids(tok, first)
    msgs = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    r = render_chat(tok, msgs, lambda t: book.lookup("t", t))
    assert r.own_answers == 1
    assert r.ids[:len(prompt1) + len(ids)] == prompt1 + ids  # turn 1's prompt, then the answer as generated
    assert tok.decode(r.ids) == tok.decode(template_ids(tok, msgs))  # the same text
    # Another tenant's book, or an edited answer, goes through the template.
    assert render_chat(tok, msgs, lambda t: book.lookup("other", t)).ids == template_ids(tok, msgs)
    edited = [*msgs[:1], {"role": "assistant", "content": text + "!"}, msgs[2]]
    assert render_chat(tok, edited, lambda t: book.lookup("t", t)).own_answers == 0


def test_marks_give_the_token_position_of_a_content_end(smollm2):
    tok = smollm2[1]
    msgs = sc.few_shot_messages(sc.FEW_SHOT_FINAL_QUESTIONS[0])
    r = render_chat(tok, msgs, lambda t: None, marks=[(2, len(msgs[2]["content"]))])
    pos = r.marks[(2, len(msgs[2]["content"]))]
    assert tok.decode(r.ids[:pos]).endswith(msgs[2]["content"])
    assert not tok.decode(r.ids[:pos - 1]).endswith(msgs[2]["content"])


def test_sampling_depends_on_the_seed_and_the_logits_only():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    draws = lambda seed, **kw: [Sampler(seed=seed, **kw)(logits) for _ in range(1)] + \
        [s(logits) for s in [Sampler(seed=seed, **kw)] for _ in range(20)]  # noqa: E731
    assert draws(7) == draws(7) and draws(7) != draws(8)
    assert Sampler(temperature=0)(logits) == int(torch.argmax(logits))
    assert Sampler(top_p=1e-6, seed=1)(logits) == int(torch.argmax(logits))  # nucleus of one token


@pytest.mark.parametrize("kw, fragment", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                          ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_values(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        Sampler(**kw)
