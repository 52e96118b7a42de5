"""The transformers adapter: exact reuse on a real model, usage fields, bad input, faults."""

import lmdb
import pytest
import torch

from engine_adapter import scenarios as sc
from engine_adapter.hf import CachedLM, Prices
from kvstore import KVStore, StoreConfig

BT = 64


@pytest.fixture
def store(tmp_path):
    s = KVStore.open(StoreConfig(path=tmp_path / "kv", host_bytes="256MiB", disk_bytes="2GiB"))
    yield s
    s.close()


def expected_hit(prompt: list[int], earlier: list[list[int]]) -> int:
    """The 64-aligned common prefix with anything stored before, computed without the store:
    stored sequences are earlier prompts + outputs cut to full blocks; at least one prompt token
    is always computed."""
    best = 0
    for seq in earlier:
        seq = seq[:len(seq) // BT * BT]
        n = 0
        while n < min(len(seq), len(prompt)) and seq[n] == prompt[n]:
            n += 1
        best = max(best, n // BT * BT)
    return min(best, (len(prompt) - 1) // BT * BT)


def check_exact(cached: CachedLM, plain: CachedLM, requests, max_new_tokens=24):
    """Runs each request with and without the cache; returns the hit tokens seen."""
    earlier, hits = [], []
    for kind, payload in requests:
        run = getattr(cached, kind)
        a = run(payload, max_new_tokens=max_new_tokens)
        b = getattr(plain, kind)(payload, max_new_tokens=max_new_tokens)
        assert a.output_ids == b.output_ids, "output with a hit differs from output without"
        assert torch.equal(a.first_logits, b.first_logits), "first-token logits differ with a hit"
        assert a.usage["prompt_cache_hit_tokens"] == expected_hit(a.prompt_ids, earlier)
        u = a.usage
        assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
        assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_cache_hit_tokens"]
        earlier.append(a.prompt_ids + a.output_ids)
        hits.append(u["prompt_cache_hit_tokens"])
    return hits


HALF_DOC = sc.DOCUMENT[: sc.DOCUMENT.rfind(". ", 0, len(sc.DOCUMENT) // 2) + 1]


def doc_messages(question):
    return [{"role": "system", "content": sc.SYSTEM_PROMPT},
            {"role": "user", "content": f"{HALF_DOC}\n\nQuestion: {question}"}]


@pytest.mark.engine
@pytest.mark.heavy
def test_long_document_two_questions_exact(smollm2, store):
    model, tok = smollm2
    hits = check_exact(CachedLM(model, tok, store), CachedLM(model, tok, None),
                       [("chat", doc_messages(q)) for q in sc.DOC_QUESTIONS[:2]])
    assert hits[0] == 0 and hits[1] >= 1500  # thousands of document tokens reused


@pytest.mark.engine
@pytest.mark.heavy  # 13 s alone, 330 s on a loaded 2-core machine: make test-all
def test_multi_turn_chat_hits_its_own_answers_exact(smollm2, store):
    model, tok = smollm2
    cached, plain = CachedLM(model, tok, store), CachedLM(model, tok, None)
    msgs, earlier, hits = [], [], []
    for turn in sc.CHAT_TURNS[:4]:
        msgs.append({"role": "user", "content": turn})
        a, b = cached.chat(msgs, max_new_tokens=40), plain.chat(msgs, max_new_tokens=40)
        assert a.output_ids == b.output_ids
        assert torch.equal(a.first_logits, b.first_logits)
        assert a.usage["prompt_cache_hit_tokens"] == expected_hit(a.prompt_ids, earlier)
        earlier.append(a.prompt_ids + a.output_ids)
        hits.append(a.usage["prompt_cache_hit_tokens"])
        msgs.append({"role": "assistant", "content": a.text})
    # each later turn reuses more: the earlier turns and the model's own answers
    assert hits[3] > hits[2] > hits[1] > 0


@pytest.mark.engine
def test_few_shot_quiz_with_a_different_last_question_exact(smollm2, store):
    model, tok = smollm2
    hits = check_exact(CachedLM(model, tok, store), CachedLM(model, tok, None),
                       [("chat", sc.few_shot_messages(q)) for q in sc.FEW_SHOT_FINAL_QUESTIONS[:2]])
    assert hits[1] >= 128


@pytest.mark.engine
def test_completion_interface_and_changed_first_message(smollm2, store):
    model, tok = smollm2
    lm = CachedLM(model, tok, store)
    doc = HALF_DOC[:3000]
    first = lm.complete(doc + "\n\nSummary:", max_new_tokens=8)
    again = lm.complete(doc + "\n\nIn one word:", max_new_tokens=8)
    assert first.usage["prompt_cache_hit_tokens"] == 0
    assert again.usage["prompt_cache_hit_tokens"] >= 448
    changed = lm.complete("Dear reader, " + doc + "\n\nIn one word:", max_new_tokens=8)
    assert changed.usage["prompt_cache_hit_tokens"] == 0  # a change early makes everything a miss


def test_a_hit_gives_bit_identical_first_logits(tiny, store):
    # The tiny model's output depends on the whole context (checked below), so wrong or
    # slightly-off KV from the store changes the logits: they must equal an uncached run's bit
    # for bit. The follow-up prompt also hits blocks holding the first answer's tokens, whose KV
    # the adapter recomputes in whole chunks before storing (decode steps differ by ulps).
    model, tok = tiny
    cached, plain = CachedLM(model, tok, store), CachedLM(model, tok, None)
    doc = tok("the quick brown fox jumps over the lazy dog " * 30)["input_ids"]
    first = cached.generate(doc, max_new_tokens=70)
    follow = doc + first.output_ids + tok(" What happened next?")["input_ids"]
    a, b = cached.generate(follow, max_new_tokens=8), plain.generate(follow, max_new_tokens=8)
    assert a.usage["prompt_cache_hit_tokens"] == (len(doc) + 70) // BT * BT > len(doc)
    assert torch.equal(a.first_logits, b.first_logits) and a.output_ids == b.output_ids
    other = plain.generate([follow[0] + 1] + follow[1:], max_new_tokens=8)  # only token 0 differs
    assert not torch.equal(other.first_logits, b.first_logits)
    assert len(set(first.output_ids)) > 10  # not one token repeated


def test_usage_and_cost(tiny, store):
    model, tok = tiny
    lm = CachedLM(model, tok, store, prices=Prices(hit_per_mtok=0.5, miss_per_mtok=2.0))
    prompt = "alpha beta gamma delta " * 60
    lm.complete(prompt, max_new_tokens=4)
    c = lm.complete(prompt, max_new_tokens=4)
    u = c.usage
    assert u["prompt_cache_hit_tokens"] == (u["prompt_tokens"] - 1) // BT * BT > 0
    assert u["completion_tokens"] == len(c.output_ids) and u["total_tokens"] == u["prompt_tokens"] + len(c.output_ids)
    assert u["cost"] == pytest.approx((u["prompt_cache_hit_tokens"] * 0.5 + u["prompt_cache_miss_tokens"] * 2.0) / 1e6)
    assert sum(c.hit_tiers.values()) * BT == u["prompt_cache_hit_tokens"]


def test_short_prompt_never_hits(tiny, store):
    model, tok = tiny
    lm = CachedLM(model, tok, store)
    for _ in range(2):
        c = lm.complete("Hello there, how are you?", max_new_tokens=3)
        assert c.usage["prompt_cache_hit_tokens"] == 0 and c.usage["prompt_tokens"] < BT


def test_changed_first_message_turns_everything_into_misses(tiny, store):
    model, tok = tiny
    lm = CachedLM(model, tok, store)
    msgs = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Tell me about the sea. " * 40}]
    lm.chat(msgs, max_new_tokens=2)
    assert lm.chat(msgs, max_new_tokens=2).usage["prompt_cache_hit_tokens"] > 0
    msgs[0] = {"role": "system", "content": "You answer at length."}
    assert lm.chat(msgs, max_new_tokens=2).usage["prompt_cache_hit_tokens"] == 0


def test_tenants_do_not_share(tiny, store):
    model, tok = tiny
    prompt = "shared prompt text " * 50
    CachedLM(model, tok, store, tenant="a").complete(prompt, max_new_tokens=2)
    assert CachedLM(model, tok, store, tenant="b").complete(prompt, max_new_tokens=2).usage["prompt_cache_hit_tokens"] == 0
    assert CachedLM(model, tok, store, tenant="a").complete(prompt, max_new_tokens=2).usage["prompt_cache_hit_tokens"] > 0


@pytest.mark.parametrize("call, arg, fragment", [
    ("complete", "", "prompt: expected a non-empty string"),
    ("complete", None, "prompt: expected a non-empty string"),
    ("chat", [], "messages: expected a non-empty list"),
    ("chat", "hello", "messages: expected a non-empty list"),
    ("chat", [{"role": "user"}], "messages[0].content: expected a string"),
    ("chat", [{"role": "robot", "content": "x"}], "messages[0].role: expected one of"),
    ("chat", ["hi"], "messages[0]: expected a dict"),
])
def test_bad_input_is_a_clear_error(tiny, store, call, arg, fragment):
    model, tok = tiny
    with pytest.raises(ValueError) as e:
        getattr(CachedLM(model, tok, store), call)(arg)
    assert fragment in str(e.value)


def test_model_whose_layout_does_not_match_the_store(tiny, smollm2, store):
    model, tok = tiny
    CachedLM(model, tok, store).complete("word " * 80, max_new_tokens=2)  # fixes the store's layout
    with pytest.raises(ValueError, match="model KV layout llama:L30:H3:D64.*use another store path"):
        CachedLM(smollm2[0], smollm2[1], store)


def test_store_faults_are_misses_and_the_request_succeeds(tiny, tmp_path):
    model, tok = tiny
    cfg = StoreConfig(path=tmp_path / "kv", host_bytes=0, disk_bytes="64MiB")
    prompt = "the quick brown fox jumps over the lazy dog " * 30
    with KVStore.open(cfg) as s:
        reference = CachedLM(model, tok, s).complete(prompt, max_new_tokens=6)
    env = lmdb.open(str(tmp_path / "kv" / "disk"), max_dbs=8)
    with env.begin(write=True) as txn:  # damage every stored record
        db = env.open_db(b"records", txn=txn)
        for k, v in list(txn.cursor(db=db)):
            txn.put(k, v[:-3] + b"xyz", db=db)
    env.close()
    with KVStore.open(cfg) as s:
        c = CachedLM(model, tok, s).complete(prompt, max_new_tokens=6)
        assert c.usage["prompt_cache_hit_tokens"] == 0 and c.output_ids == reference.output_ids
        assert torch.equal(c.first_logits, reference.first_logits)
        stored = (len(reference.prompt_ids) + len(reference.output_ids)) // BT
        assert s.stats()["corrupt_records"] == stored  # each detected, counted and removed
        s.flush()  # the healing put is write-behind and this store has no RAM tier
        again = CachedLM(model, tok, s).complete(prompt, max_new_tokens=6)  # healed by the put
        assert again.usage["prompt_cache_hit_tokens"] == (len(prompt_ids := again.prompt_ids) - 1) // BT * BT
        assert again.output_ids == reference.output_ids and len(prompt_ids) > BT
        assert torch.equal(again.first_logits, reference.first_logits)


def test_a_closed_store_is_a_miss_not_a_failure(tiny, store):
    model, tok = tiny
    lm = CachedLM(model, tok, store)
    store.close()
    c = lm.complete("some words " * 40, max_new_tokens=2)
    assert c.usage["prompt_cache_hit_tokens"] == 0 and len(c.output_ids) == 2


@pytest.mark.engine
@pytest.mark.heavy
def test_a_second_machine_answers_from_the_remote_tier_with_the_same_output(smollm2, tmp_path):
    from tools.valkey_server import ValkeyServer
    model, tok = smollm2
    prompt = HALF_DOC[:3000] + "\n\nIn one word:"
    with ValkeyServer() as server:
        def machine(name):
            return KVStore.open(StoreConfig(path=tmp_path / name, host_bytes="256MiB",
                                            disk_bytes="1GiB", remote_url=server.url,
                                            remote_timeout_s=2.0))
        with machine("a") as a:
            first = CachedLM(model, tok, a).complete(prompt, max_new_tokens=8)
            assert a.flush()
        with machine("b") as b:  # empty disk, empty RAM: only Valkey is shared
            second = CachedLM(model, tok, b).complete(prompt, max_new_tokens=8)
            assert second.usage["prompt_cache_hit_tokens"] >= 448
            assert b.metrics.value("hit_tokens", tier="remote") == second.usage["prompt_cache_hit_tokens"]
    assert second.output_ids == first.output_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_hit_is_bit_identical_from_the_device_tier_and_from_disk(tiny, tmp_path):
    """The model on the GPU, the store's hot tier on it too: blocks are cut from the CUDA cache,
    stored through pinned host memory to disk, and glued back on the GPU; a hit's first logits
    equal an uncached CUDA run's bit for bit, whether they came from the device tier or disk."""
    import copy

    model, tok = copy.deepcopy(tiny[0]).to("cuda"), tiny[1]
    cfg = StoreConfig(path=tmp_path / "kv", device="cuda", device_bytes="64MiB", host_bytes="64MiB",
                      disk_bytes="1GiB")
    doc = tok("the quick brown fox jumps over the lazy dog " * 30)["input_ids"]
    plain = CachedLM(model, tok, None).generate(doc, max_new_tokens=8)
    with KVStore.open(cfg) as s:
        cached = CachedLM(model, tok, s)
        cached.generate(doc, max_new_tokens=8)
        hot = cached.generate(doc, max_new_tokens=8)
        assert hot.hit_tiers.get("device", 0) > 0
    with KVStore.open(cfg) as s:  # a restart: the blocks come from disk
        cold = CachedLM(model, tok, s).generate(doc, max_new_tokens=8)
    for r in (hot, cold):
        assert r.usage["prompt_cache_hit_tokens"] == (len(doc) - 1) // BT * BT
        assert r.first_logits.device.type == "cpu"
        assert torch.equal(r.first_logits, plain.first_logits) and r.output_ids == plain.output_ids
