"""The prefill graphs' buckets (runner/prefill_graph.py); the captured passes themselves run on the GPU
(tests/engine/test_gpu_backend.py) and their padded pass under the interpreter (test_gpu_backend_interpreted.py)."""

from __future__ import annotations

import pytest
import torch

from replayllm.runner.prefill_graph import GRAPH_BUCKETS, PrefillGraphs, graph_buckets


def test_buckets_stop_at_the_largest_chunk():
    assert graph_buckets(512) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert graph_buckets(600) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 600]
    assert graph_buckets(10) == [10]
    assert graph_buckets(16) == [16]


def test_from_48_rows_on_padding_is_at_most_a_third_of_a_pass():
    for smaller, bucket in zip(GRAPH_BUCKETS[2:], GRAPH_BUCKETS[3:]):
        assert bucket % 16 == 0
        assert (bucket - (smaller + 1)) / bucket <= 1 / 3


@pytest.mark.parametrize("bad", [0, -3])
def test_a_bucket_list_needs_a_row(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        graph_buckets(bad)


def test_a_chunk_takes_the_smallest_bucket_that_holds_it():
    graphs = PrefillGraphs(prefiller=None, page_table_row=torch.zeros(4, dtype=torch.int32), max_tokens=100)
    assert graphs.max_tokens == 100
    assert [graphs.bucket_for(n) for n in (1, 16, 17, 49, 96, 97, 100)] == [16, 16, 32, 64, 96, 100, 100]
    assert graphs.bucket_for(101) is None
    with pytest.raises(ValueError, match="1..100 tokens"):
        graphs.run(torch.zeros(101, dtype=torch.int64), 0)
