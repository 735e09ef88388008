import itertools

import pytest

from extensible import ContextTooLongError, Layout, UserError, smallest_k


@pytest.mark.parametrize("policy", ["session", "sliding"])
@pytest.mark.parametrize("window,chunk,k", [(96, 16, 4), (64, 16, 2), (1024, 512, 16), (100, 7, 3)])
def test_every_context_up_to_capacity_fits_the_window(policy, window, chunk, k):
    layout = Layout(window, chunk, k, policy)
    previous = 0
    for n in range(layout.capacity() + 1):
        c = layout.compressed_chunks(n)
        assert c * chunk <= n, "only complete chunks are compressed"
        assert c * layout.slots_per_chunk + n - c * chunk <= window, "the LLM input fits the window"
        assert c >= previous, "compressed chunks never come back"
        previous = c
    with pytest.raises(ContextTooLongError):
        layout.compressed_chunks(layout.capacity() + 1)


def test_no_compression_while_the_window_is_not_full():
    layout = Layout(96, 16, 4)
    assert layout.compressed_chunks(96) == 0
    assert layout.limit(0) == 96


def test_a_full_session_compresses_all_its_complete_chunks():
    layout = Layout(96, 16, 4, "session")
    # 97 tokens overflow the window: chunks 0..5 (96 tokens) become 6 x 4 = 24 embeddings, 1 token stays raw.
    assert layout.compressed_chunks(97) == 6
    # The next session runs until 24 + raw reaches 96: raw may grow to 72 tokens (context 96 + 72 = 168).
    assert layout.compressed_chunks(168) == 6
    assert layout.compressed_chunks(169) == 10


def test_sliding_compresses_one_chunk_at_a_time():
    layout = Layout(96, 16, 4, "sliding")
    assert [layout.compressed_chunks(n) for n in (96, 97, 108, 109)] == [0, 1, 1, 2]


def test_larger_k_holds_more():
    capacities = [Layout(1024, 512, k).capacity() for k in (2, 4, 8, 16, 32)]
    assert capacities == sorted(capacities) and capacities[-1] > 16 * 1024


@pytest.mark.parametrize("n,window,chunk", itertools.product([500, 5000, 20000], [256, 1024], [64, 128]))
def test_smallest_k_fits_and_one_less_does_not(n, window, chunk):
    k = smallest_k(n, window, chunk)
    if k is None:
        assert Layout(window, chunk, chunk).capacity() < n
        return
    assert Layout(window, chunk, k).capacity() >= n
    if k > 1:
        assert Layout(window, chunk, k - 1).capacity() < n


def test_too_long_message_suggests_a_k_that_fits():
    with pytest.raises(ContextTooLongError, match=r"use k >= 8"):
        Layout(1024, 512, 4).compressed_chunks(5000)


def test_window_must_exceed_the_chunk():
    with pytest.raises(UserError, match="larger than the chunk"):
        Layout(512, 512, 4)
