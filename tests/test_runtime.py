import pytest
import torch

from extensible import ContextTooLongError, ExtensibleLM, UserError


def make_ids(n, seed=0, vocab=97):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def embedder_calls(lm):
    calls = []
    handle = lm.embedder.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_without_extensible_embeddings_the_logits_are_the_plain_llm(tiny_lm):
    ids = make_ids(90)  # fits the 96-token window: nothing is compressed
    score = tiny_lm.score(ids, 40, k=4)
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_lm.llm(ids[None]).logits[0].float(), -1)
    plain = -logprobs[49:89].gather(1, ids[50:90, None])[:, 0]
    # the whole sequence's logits against score's 40 kept positions: other matmul shapes, so a float tolerance
    torch.testing.assert_close(score.token_nll, plain, rtol=0, atol=1e-5)


def test_compressed_context_changes_the_prediction(tiny_lm):
    ids = make_ids(300)
    assert tiny_lm.layout(4).compressed_chunks(299) > 0
    assert not torch.allclose(tiny_lm.score(ids, 50, 4).token_nll, tiny_lm.score_window(ids, 50).token_nll)


@pytest.mark.parametrize("method", ["strided", "random", "mean", "terminal"])
def test_offline_equals_online_and_streaming(tiny_lm, method):
    tiny_lm.method = method
    ids = make_ids(300, seed=1)
    full = tiny_lm.encode(ids)
    assert full.shape == (300, tiny_lm.hidden_size)

    calls, handle = embedder_calls(tiny_lm)
    offline = {k: tiny_lm.score(ids, 120, k, full=full) for k in (4, 8)}
    handle.remove()
    assert not calls, "offline mode must not run the embedder"

    for k, score in offline.items():
        online = tiny_lm.score(ids, 120, k)
        assert torch.allclose(online.token_nll, score.token_nll, atol=1e-6)
        session = tiny_lm.stream(k, block=13)
        streamed = torch.cat([session.feed(ids[i : i + 37]) for i in range(0, 300, 37)])
        assert torch.isnan(streamed[0])
        assert torch.allclose(-streamed[-120:], score.token_nll, atol=1e-4)


def test_full_resolution_rows_are_the_embedder_outputs_per_chunk(tiny_lm):
    ids = make_ids(40)  # two complete 16-token chunks and a partial one of 8
    full = tiny_lm.encode(ids)
    with torch.no_grad():
        for start in (0, 16, 32):
            chunk = ids[start : start + 16]
            assert torch.allclose(full[start : start + len(chunk)], tiny_lm.embedder(chunk[None])[0], atol=1e-5)


def test_streaming_memory_stays_within_the_window(tiny_lm):
    session = tiny_lm.stream(8, block=50)
    ids = make_ids(600, seed=2)
    for i in range(0, 600, 50):
        session.feed(ids[i : i + 50])
        held = len(session.ex) + len(session.raw)
        assert held <= tiny_lm.window
        assert session.cache.get_seq_length() <= tiny_lm.window
    assert session.chunks > 20


def test_generation_follows_the_online_session_across_boundaries(tiny_lm):
    ids = make_ids(150, seed=3)
    k = 4
    generated = tiny_lm.generate(ids, k, max_new_tokens=40)
    # Greedy decoding by hand through the streaming session: the same tokens.
    session = tiny_lm.stream(k)
    session.feed(ids)
    expected = []
    for _ in range(40):
        token = int(session.next_logprobs.argmax())
        expected.append(token)
        if token == 1:
            break
        session.feed([token])
    assert tiny_lm.layout(k).compressed_chunks(150) < tiny_lm.layout(k).compressed_chunks(189), "crosses a session"
    assert generated == expected


def test_generation_offline_uses_stored_rows(tiny_lm):
    ids = make_ids(200, seed=4)
    full = tiny_lm.encode(ids)
    assert tiny_lm.generate(ids, 4, max_new_tokens=5, full=full) == tiny_lm.generate(ids, 4, max_new_tokens=5)


def test_the_llm_never_changes_and_never_requires_grad(tiny_lm):
    before = {name: p.detach().clone() for name, p in tiny_lm.llm.named_parameters()}
    ids = make_ids(300)
    tiny_lm.score(ids, 64, 4)
    tiny_lm.generate(ids[:200], 4, max_new_tokens=4)
    # A backward pass through the embedder reaches no LLM parameter.
    out = tiny_lm.embedder.body(input_ids=ids[None, :16]).last_hidden_state
    logits = tiny_lm.llm(inputs_embeds=out).logits
    logits.float().logsumexp(-1).mean().backward()
    assert any(p.grad is not None for p in tiny_lm.embedder.parameters() if p.requires_grad)
    for name, p in tiny_lm.llm.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, before[name]), name


def test_bad_inputs_are_user_errors(tiny_lm):
    ids = make_ids(300)
    with pytest.raises(UserError, match="more than"):
        tiny_lm.score(ids[:10], 10, 4)
    with pytest.raises(UserError, match="larger than a chunk"):
        tiny_lm.score(ids, 10, 17)
    with pytest.raises(UserError, match="must fit the window"):
        tiny_lm.score_window(ids, 200)
    with pytest.raises(ContextTooLongError, match="use k >="):
        tiny_lm.score(make_ids(1000), 10, 2)
    with pytest.raises(UserError, match="exceeds the LLM"):
        ExtensibleLM(tiny_lm.llm, tiny_lm.tokenizer, tiny_lm.embedder, window=4096)


def test_a_raw_prefix_is_read_in_front_and_never_compressed(tiny_lm):
    ids, prefix = make_ids(300), make_ids(10) + 1
    layout = tiny_lm.layout(4, len(prefix))  # the window less the prefix's positions
    assert layout.window == tiny_lm.window - 10
    chunks = layout.compressed_chunks(299)
    assert chunks > 0
    with torch.no_grad():
        ex = tiny_lm.extensible_embeddings(ids, chunks, 4)
        embed = tiny_lm.llm.get_input_embeddings()
        inputs = torch.cat([embed(prefix), ex, embed(ids[chunks * 16 : 299])])[None]  # by hand: prefix, rows, raw
        assert inputs.shape[1] <= tiny_lm.window
        expected = -torch.log_softmax(tiny_lm.llm(inputs_embeds=inputs).logits[0, -1].float(), -1)[ids[299]]
    score = tiny_lm.score(ids, 1, 4, prefix=prefix).token_nll
    torch.testing.assert_close(score, expected[None], rtol=0, atol=1e-5)
    assert not torch.allclose(score, tiny_lm.score(ids, 1, 4).token_nll)  # the prefix is read
    new = tiny_lm.generate(ids, 4, max_new_tokens=3, prefix=prefix)
    assert 1 <= len(new) <= 3
