"""`kvstore explain A B` on text, token-id and chat prompts, with the default model's tokenizer
(given with --tokenizer, or recorded in the store's namespace).

Expected hits are computed here independently (tokenize, find the first different token, round
down to whole blocks) and compared with what explain reports.
"""

import json
import time

import pytest

from kvstore import make_namespace
from tools.explain import load_tokenizer

from ..conftest import BLOCK_TOKENS, make_block

BT = 16
# A chat template in the style of reasoning models: an assistant turn's reasoning_content is
# rendered only while it is the latest turn, and dropped once a user turn follows it.
REASONING_TEMPLATE = """\
{%- set last = namespace(user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content is defined and loop.index0 > last.user %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""
SYSTEM = {"role": "system", "content": "You answer questions about geography, briefly and precisely. " * 3}
USER1 = {"role": "user", "content": "What is the capital of France, and since when has it been the capital?"}
REPLY1 = {"role": "assistant", "content": "Paris, since the late 10th century.",
          "reasoning_content": "France's capital is Paris; Hugh Capet made it the royal seat in 987."}
USER2 = {"role": "user", "content": "And the capital of Germany?"}


@pytest.fixture(scope="module")
def tokdir():
    """The default model's converted directory, which holds its tokenizer (converted on first use)."""
    from engine_adapter import model_files
    path = model_files.default_convert_dir()
    if not (path / "tokenizer_config.json").is_file():
        model_files.load_default_model()
    return path


@pytest.fixture(scope="module")
def tok(tokdir):
    return load_tokenizer(tokdir)


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_chat_template_dropping_reasoning_content_is_named(kv, tok, tokdir, tmp_path):
    a = write(tmp_path, "turn1.json", [SYSTEM, USER1, REPLY1])  # the stored conversation
    b = write(tmp_path, "turn2.json", {"model": "m", "messages": [SYSTEM, USER1, REPLY1, USER2]})
    tpl = write(tmp_path, "reasoning.jinja", REASONING_TEMPLATE)
    code, r, err = kv("explain", a, b, "--tokenizer", tokdir, "--chat-template", tpl, "--block-tokens", BT, "--json")
    assert code == 0, err
    ids_a = tok.apply_chat_template([SYSTEM, USER1, REPLY1], chat_template=REASONING_TEMPLATE)["input_ids"]
    ids_b = tok.apply_chat_template([SYSTEM, USER1, REPLY1, USER2], chat_template=REASONING_TEMPLATE,
                                    add_generation_prompt=True)["input_ids"]
    d = first_diff(ids_a, ids_b)
    assert r["a"]["tokens"] == len(ids_a) and r["b"]["tokens"] == len(ids_b)
    assert r["first_different_token"] == d and r["b_after_a"]["hit_tokens"] == d // BT * BT
    chat = r["chat"]
    assert chat["template_dropped"] == [{"message": 2, "role": "assistant", "field": "reasoning_content",
                                         "rendered_in": "A"}]
    assert chat["where_a"]["message"] == 2 and chat["where_a"]["field"] == "reasoning_content"
    assert chat["where_b"] == {"message": 2, "role": "assistant", "field": "content", "offset": 0, "in": "field"}
    assert "renders its reasoning_content in A and drops it in B" in r["summary"]
    assert "<think>" in r["divergence"]["text_a"] and "<think>" not in r["divergence"]["text_b"]
    _, text, _ = kv("explain", a, b, "--tokenizer", tokdir, "--chat-template", tpl, "--block-tokens", BT)
    assert "why        messages[2] (assistant) is the same in A and B" in text
    assert f"> {d:>7}" in text and "'<'" in text  # the marked row shows the token pieces


def test_a_changed_system_prompt_misses_from_block_zero(kv, tokdir, tmp_path):
    a = write(tmp_path, "a.json", [SYSTEM, USER1])
    b = write(tmp_path, "b.json", [{"role": "system", "content": "Be brief. " + SYSTEM["content"]}, USER1])
    _, r, _ = kv("explain", a, b, "--tokenizer", tokdir, "--block-tokens", BT, "--json")
    assert r["b_after_a"]["hit_tokens"] == 0 and r["first_different_block"] == 0
    assert r["chat"]["first_different_message"] == 0 and r["chat"]["changed_fields"] == ["content"]
    assert r["summary"] == "messages[0] (system) differs in content"
    assert r["blocks"][0]["state"] == "first difference"


def test_the_next_turn_hits_the_whole_stored_conversation(kv, tok, tokdir, tmp_path):
    a = write(tmp_path, "a.json", [SYSTEM, USER1, {"role": "assistant", "content": REPLY1["content"]}])
    b = write(tmp_path, "b.json", [SYSTEM, USER1, {"role": "assistant", "content": REPLY1["content"]}, USER2])
    _, r, _ = kv("explain", a, b, "--tokenizer", tokdir, "--block-tokens", BT, "--json")
    n = r["a"]["tokens"]
    assert r["first_different_token"] == n and r["b_after_a"]["hit_tokens"] == n // BT * BT
    assert r["summary"].startswith("B starts with all of A; the last") and r["chat"]["where_a"] is None


def test_text_prompts_show_the_split_in_text_and_tokens(kv, tok, tokdir, tmp_path):
    doc = "Quarterly report.\n" + "Revenue grew in every region except the north. " * 12
    a = write(tmp_path, "a.txt", doc + "\nQuestion: which region shrank?")
    b = write(tmp_path, "b.txt", doc + "\nQuestion: which region grew most?")
    _, r, _ = kv("explain", a, b, "--tokenizer", tokdir, "--block-tokens", BT, "--json", "--context", "2")
    ids_a = tok(doc + "\nQuestion: which region shrank?")["input_ids"]
    ids_b = tok(doc + "\nQuestion: which region grew most?")["input_ids"]
    d = first_diff(ids_a, ids_b)
    assert r["first_different_token"] == d and r["b_after_a"]["hit_blocks"] == d // BT
    div = r["divergence"]
    assert [t["pos"] for t in div["tokens"]] == list(range(d - 2, d + 3))
    assert div["tokens"][2]["a_text"] == tok.decode([ids_a[d]]) and div["tokens"][2]["b"] == ids_b[d]
    assert div["text_a"][div["context_chars"][0]:] == " shrank?"
    assert div["line_col_a"] == "line 3, column 23"
    w = write(tmp_path, "w.txt", doc.replace("north. Revenue", "north.  Revenue", 1) + "\nQuestion: which region shrank?")
    assert kv("explain", a, w, "--tokenizer", tokdir, "--json")[1]["summary"] == "the prompts differ only in whitespace from here on"


def test_token_id_files_need_no_tokenizer(kv, tmp_path, monkeypatch):
    import tools.explain
    monkeypatch.setattr(tools.explain, "load_tokenizer", lambda *a: pytest.fail("tokenizer loaded"))
    a = write(tmp_path, "a.json", list(range(40)))
    b = write(tmp_path, "b.json", {"prompt_token_ids": list(range(35)) + [1] * 30})
    short = write(tmp_path, "short.json", [1, 2, 3])
    code, r, _ = kv("explain", a, b, "--block-tokens", BT, "--json")
    assert code == 0 and r["first_different_token"] == 35 and r["b_after_a"]["hit_tokens"] == 32
    assert [row["state"] for row in r["blocks"]] == ["same", "same", "only in B", "only in B"]
    assert "a_text" not in r["divergence"]["tokens"][0]
    _, r, _ = kv("explain", short, short, "--json")
    assert r["summary"] == "A and B are the same tokens" and r["b_after_a"]["hit_tokens"] == 0
    code, text, _ = kv("explain", short, b, "--block-tokens", BT)
    assert code == 0 and "0 of 65 prompt tokens hit" in text


def test_a_tokenizer_directory(kv, tok, tmp_path):
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    (d / "chat_template.jinja").write_text(REASONING_TEMPLATE)  # the directory's own template
    a = write(tmp_path, "a.json", [USER1, REPLY1])
    b = write(tmp_path, "b.json", [USER1, REPLY1, USER2])
    _, r, _ = kv("explain", a, b, "--tokenizer", d, "--block-tokens", BT, "--json")
    assert r["chat"]["template_dropped"][0]["field"] == "reasoning_content"
    code, _, err = kv("explain", a, b, "--tokenizer", tmp_path / "nope")
    assert code == 1 and "cannot load a tokenizer" in err


def test_stored_output_against_the_reply_the_client_sent_back(kv, tok, tokdir, tmp_path):
    """A: what the engine stored for turn 1 (prompt + its own output ids); B: turn 2, whose
    history holds a different reply."""
    prompt = tok.apply_chat_template([SYSTEM, USER1], add_generation_prompt=True)["input_ids"]
    stored = prompt + tok("Paris has been the capital since 987.")["input_ids"]
    a = write(tmp_path, "a.json", stored)
    b = write(tmp_path, "b.json", [SYSTEM, USER1, {"role": "assistant", "content": "It is Paris."}, USER2])
    _, r, _ = kv("explain", a, b, "--tokenizer", tokdir, "--block-tokens", BT, "--json")
    assert r["first_different_token"] == len(prompt) and r["a"]["kind"] == "ids"
    assert r["chat"]["where_b"]["message"] == 2 and r["chat"]["where_b"]["field"] == "content"
    assert r["summary"].startswith("B's messages[2].content (assistant) is not what A holds there")


def test_same_text_tokenized_differently(kv, tok, tokdir, tmp_path):
    word = "unbelievable"
    a = write(tmp_path, "a.json", tok(word)["input_ids"])
    b = write(tmp_path, "b.json", tok.convert_tokens_to_ids(list(word)))  # one token a letter
    _, r, _ = kv("explain", a, b, "--tokenizer", tokdir, "--json")
    assert r["summary"].startswith("same text, tokenized differently")



# -- which tokenizer: --tokenizer, or the model the namespace records; never a guess ----------
def store_holding(tmp_path, open_store, clock, namespace, ids):
    """A store at tmp_path/store whose only namespace is ``namespace``, holding ``ids``' blocks
    (written now: the CLI reads with the real clock)."""
    clock.now = time.time()
    with open_store() as store:
        store.put(ids, [make_block(i) for i in range(len(ids) // BLOCK_TOKENS)], namespace=namespace)
        store.flush()
    return tmp_path / "store"


def test_a_text_prompt_without_a_known_tokenizer_is_refused(kv, tmp_path, open_store, clock, monkeypatch):
    import tools.explain
    monkeypatch.setattr(tools.explain, "load_tokenizer", lambda *a: pytest.fail("a tokenizer was guessed"))
    a = write(tmp_path, "a.txt", "Quarterly report. Revenue grew in every region.")
    code, _, err = kv("explain", a, a)
    assert code == 1 and "needs a tokenizer and none is known" in err and "--tokenizer DIR" in err
    # A store whose namespaces record no model (plain names), or only a digest of the weights
    # (the transformers adapter's default identity): said so, still no guess.
    path = store_holding(tmp_path, open_store, clock, "tenant-a", list(range(2 * BLOCK_TOKENS)))
    code, _, err = kv("explain", a, a, "--path", path)
    assert code == 1 and "namespaces record no model" in err and "--tokenizer DIR" in err
    digest = make_namespace("0123456789abcdef", "llama:L2:H2:D4:bfloat16", "bfloat16")
    code, _, err = kv("explain", a, a, "--namespace", digest)
    assert code == 1 and "only a digest of the model's weights" in err and "--tokenizer DIR" in err


@pytest.mark.parametrize("recorded", ["dir", "vllm"])
def test_the_tokenizer_of_the_model_the_namespace_records(recorded, kv, tok, tokdir, tmp_path, open_store, clock):
    """The adapters record the model in the namespace: a model_id (a directory or a name) as it
    is, vLLM as NAME@REVISION#CONFIG-DIGEST. explain tokenizes with that model's tokenizer."""
    text = "Quarterly report. " + "Revenue grew in every region except the north. " * 4
    ids = tok(text)["input_ids"]
    model = str(tokdir) if recorded == "dir" else f"{tokdir}@#0123456789abcdef"
    ns = make_namespace(model, "llama:L2:H2:D4:bfloat16", "bfloat16")
    path = store_holding(tmp_path, open_store, clock, ns, ids)
    a = write(tmp_path, "a.txt", text)
    # (--block-tokens: the CLI takes the block size from its config, not yet from the store)
    code, r, err = kv("explain", a, a, "--path", path, "--block-tokens", BLOCK_TOKENS, "--json")
    assert code == 0, err
    assert r["tokenizer"] == {"source": str(tokdir), "from": "the model the store's namespaces record"}
    assert r["namespace"] == ns and r["a"]["tokens"] == len(ids)
    assert r["store"]["a_held"] == len(ids) // BLOCK_TOKENS
    _, text_out, _ = kv("explain", a, a, "--path", path, "--block-tokens", BLOCK_TOKENS)
    assert f"tokenizer  {tokdir}  (the model the store's namespaces record)" in text_out
    # Without a store, --namespace names the model just as well.
    code, r, err = kv("explain", a, a, "--namespace", ns, "--json")
    assert code == 0 and r["tokenizer"]["from"] == f"the model of namespace {ns}" and r["a"]["tokens"] == len(ids)


def test_openai_content_parts_read_as_the_joined_text(kv, tok, tokdir, tmp_path):
    """`"content": [{"type": "text", ...}]` is what OpenAI clients send; the template gets the
    parts joined (as vLLM joins them), so the prompt tokenizes as the plain-string one does."""
    parts = [{"type": "text", "text": "What is the capital of France,"},
             {"type": "text", "text": "and since when has it been the capital?"}]
    a = write(tmp_path, "a.json", [SYSTEM, {"role": "user", "content": parts}])
    b = write(tmp_path, "b.json", [SYSTEM, {"role": "user", "content": "\n".join(p["text"] for p in parts)}])
    code, r, err = kv("explain", a, b, "--tokenizer", tokdir, "--block-tokens", BT, "--json")
    assert code == 0, err
    want = tok.apply_chat_template([SYSTEM, json.loads(b.read_text())[1]], tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert r["a"]["tokens"] == r["b"]["tokens"] == len(want) and r["first_different_token"] is None


def test_token_ids_beyond_the_vocabulary_are_refused(kv, tok, tokdir, tmp_path):
    size = len(tok)
    a = write(tmp_path, "a.json", [1, 2, 3, size - 1])
    b = write(tmp_path, "b.json", [1, 2, size, 4])
    code, _, err = kv("explain", a, b, "--tokenizer", tokdir)
    assert code == 1 and f"b.json: token id {size} at position 2 is beyond the tokenizer's vocabulary " \
                          f"(ids 0 to {size - 1})" in err
    assert kv("explain", a, a, "--tokenizer", tokdir)[0] == 0
