"""The packed CPU GEMM (``vlm.kernels.cpu_gemm``): equal to ``F.linear`` at every row count, and
run at a bounded set of row counts, so that oneDNN's per-shape primitive cache stays small in a
long-running server (benchmarks/soak.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm.kernels import cpu_gemm


def test_row_buckets_cover_each_count_and_are_few():
    buckets = {cpu_gemm.row_bucket(rows) for rows in range(1, 513)}
    assert all(cpu_gemm.row_bucket(rows) >= rows for rows in range(1, 4097))
    assert all(cpu_gemm.row_bucket(rows) == rows for rows in range(1, 17))  # decode batches run exact
    assert len(buckets) <= 32, sorted(buckets)
    # at most twice the rows (17 -> 32), where weight reads, not rows, bound the time
    assert max(cpu_gemm.row_bucket(rows) / rows for rows in range(17, 4097)) < 2


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 40, 129, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(48, 64)
    packed = cpu_gemm.pack_weight(weight)
    if packed is None:
        pytest.skip("oneDNN packing is not available on this CPU / torch build")
    b = torch.randn(48) if bias else None
    x = torch.randn(rows, 64)
    got = cpu_gemm.linear(x.view(1, rows, 64), weight, b, packed)
    assert got.shape == (1, rows, 48)
    torch.testing.assert_close(got[0], F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
