import numpy as np
import pytest
import torch

from extensible import UserError, downscale_chunk, kept_positions, rows_needed


def test_strided_keeps_the_last_of_every_k():
    assert kept_positions(16, 4).tolist() == [3, 7, 11, 15]
    assert kept_positions(16, 1).tolist() == list(range(16))


def test_strided_keeps_the_chunk_end_when_k_does_not_divide():
    assert kept_positions(10, 4).tolist() == [3, 7, 9]
    assert kept_positions(10, 10).tolist() == [9]


@pytest.mark.parametrize("method", ["strided", "terminal", "random", "mean"])
@pytest.mark.parametrize("length,k", [(16, 1), (16, 4), (10, 3), (7, 7), (512, 32)])
def test_every_method_keeps_ceil_length_over_k(method, length, k):
    outputs = torch.randn(length, 8)
    kept = downscale_chunk(outputs, k, method)
    assert kept.shape == (-(-length // k), 8)


def test_terminal_keeps_the_last_outputs():
    assert kept_positions(16, 4, "terminal").tolist() == [12, 13, 14, 15]


def test_random_is_sorted_distinct_and_reproducible_per_chunk():
    a = kept_positions(64, 4, "random", seed=1, chunk_index=3)
    assert (np.diff(a) > 0).all() and len(a) == 16
    assert a.tolist() == kept_positions(64, 4, "random", seed=1, chunk_index=3).tolist()
    assert a.tolist() != kept_positions(64, 4, "random", seed=1, chunk_index=4).tolist()


def test_mean_pools_each_group_including_a_short_last_one():
    outputs = torch.arange(10, dtype=torch.float32)[:, None]
    assert downscale_chunk(outputs, 4, "mean")[:, 0].tolist() == [1.5, 5.5, 8.5]
    assert rows_needed(10, 4, "mean").tolist() == list(range(10))


def test_selection_matches_gathering_rows_needed():
    outputs = torch.randn(40, 4)
    for method in ("strided", "terminal", "random"):
        assert torch.equal(downscale_chunk(outputs, 6, method, 5, 2), outputs[rows_needed(40, 6, method, 5, 2)])


@pytest.mark.parametrize("k", [0, -3, 17])
def test_bad_k_is_a_user_error(k):
    with pytest.raises(UserError, match="k"):
        kept_positions(16, k)


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="unknown down-scaling"):
        kept_positions(16, 4, "median")
