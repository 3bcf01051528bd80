"""Launch policies: the eager loop and the CUDA graphs make the same choices for the same batch.

A split-KV count or a sampler chunk count changes a row's floating-point result, so a batch of
n rows (eager) and the bucket it is padded to (graph replay) must get the same ones.
"""
from __future__ import annotations

import pytest

from elastic_decode.worker.cuda_graphs import batch_buckets
from elastic_decode.kernels.launch_policy import MAX_SPLITS, choose_num_chunks, choose_num_splits, rows_class


@pytest.mark.parametrize("max_num_seqs", [1, 7, 16, 40, 100, 256, 512])
@pytest.mark.parametrize("num_sms", [1, 108, 132])
def test_a_batch_and_its_graph_bucket_get_the_same_launches(max_num_seqs, num_sms):
    buckets = batch_buckets(max_num_seqs)
    for n in range(1, max_num_seqs + 1):
        bucket = next(b for b in buckets if b >= n)
        assert rows_class(n) == rows_class(bucket), (n, bucket)
        for kv_heads in (1, 2, 3, 8):
            assert choose_num_splits(n, kv_heads, num_sms) == choose_num_splits(bucket, kv_heads, num_sms)
        for vocab in (49152, 151936):
            assert choose_num_chunks(n, vocab, num_sms) == choose_num_chunks(bucket, vocab, num_sms)


def test_split_and_chunk_counts_fill_the_gpu_and_stay_bounded():
    assert choose_num_splits(256, 2, 132) == 1  # 512 programs: no split
    assert choose_num_splits(1, 2, 132) == MAX_SPLITS  # 2 programs: split as far as allowed
    assert choose_num_splits(16, 2, 132) == 16  # 32 programs x 16: at least two waves of 132 SMs
    assert choose_num_chunks(256, 151936, 132) == 4  # 1024 programs: at least four per SM
    assert choose_num_chunks(1, 151936, 132) == 16
    assert choose_num_chunks(1, 5000, 132) == 1  # chunks of at least MIN_CHUNK tokens
    for n in (1, 3, 64, 1000):
        s, c = choose_num_splits(n, 2, 132), choose_num_chunks(n, 151936, 132)
        assert s & (s - 1) == 0 and c & (c - 1) == 0 and 1 <= s <= MAX_SPLITS
