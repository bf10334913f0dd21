"""Attention masks the transformers fallback needs (Gemma 3, PaliGemma), in the kernels and the
engine: bidirectional spans and sliding windows over the paged KV cache.

- kernels: the torch path against a naive float64 formula of transformers' mask composition
  (``(key <= query or same span) and key > query - W``), and the Triton kernels (under
  ``TRITON_INTERPRET=1`` without a GPU) against the torch path, over chunks that continue a
  cached prefix, several sequences, GQA and odd lengths;
- scheduler: a chunk never ends inside a span (shortened before it, or the span runs whole as the
  step's first chunk when it exceeds the budget); a cached prefix never ends inside one;
- input validation: bad spans are a one-line error.
"""

import itertools
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402

from vlm.engine.input_processor import check_bidirectional_spans  # noqa: E402
from vlm.engine.kv_cache import BlockAllocator  # noqa: E402
from vlm.engine.scheduler import Scheduler  # noqa: E402
from vlm.engine.sequence import Sequence  # noqa: E402
from vlm.errors import InputError  # noqa: E402
from vlm.inputs import ModelInputs  # noqa: E402
from vlm.kernels import torch_attention as torch_attn  # noqa: E402
from vlm.sampling_params import SamplingParams  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
BLOCK = 4


@pytest.fixture
def ta():
    pytest.importorskip("triton")
    module = importlib.import_module("vlm.kernels.triton_attention")
    if not ON_GPU and not module.INTERPRETED:
        pytest.skip("triton kernels were defined before TRITON_INTERPRET=1 was set, and there is no GPU")
    return module


def paged(contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each sequence's ``[L, Hk, D]`` keys (or values) into shuffled cache blocks."""
    heads, dim = contexts[0].shape[1:]
    needed = [-(-len(c) // BLOCK) for c in contexts]
    num_blocks = sum(needed) + 2
    cache = torch.randn(num_blocks, BLOCK, heads, dim)
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(contexts), max(needed), dtype=torch.int32)
    i = 0
    for s, (n, context) in enumerate(zip(needed, contexts)):
        tables[s, :n] = perm[i : i + n]
        for p in range(len(context)):
            cache[tables[s, p // BLOCK], p % BLOCK] = context[p]
        i += n
    return cache.to(DEVICE), tables.to(DEVICE)


def naive(q, k, v, spans, window, scale):
    """One sequence's last ``len(q)`` queries over ``len(k)`` keys, float64, transformers' mask."""
    t, length = q.shape[0], k.shape[0]
    rows = torch.arange(t)[:, None] + (length - t)
    keys = torch.arange(length)[None, :]
    visible = keys <= rows
    if spans is not None:
        visible |= (keys >= spans[:, :1]) & (keys < spans[:, 1:])
    if window is not None:
        visible &= keys > rows - window
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("thd,lhd->htl", q.double(), kk) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), vv).float()


# (query_len, context_len, spans within the sequence or None): fresh prompts, continued chunks
SEQUENCES = [
    (13, 13, [(3, 9)]),  # an image-like span inside a prompt
    (6, 17, [(12, 16)]),  # a chunk continuing a cached prefix, with a span
    (9, 9, [(0, 9)]),  # PaliGemma: the whole prompt is one span
    (5, 22, None),  # no span
]


def spans_tensor(query_len, context_len, spans):
    rows = torch.zeros(query_len, 2, dtype=torch.int32)
    for start, end in spans or ():
        for position in range(start, end):
            row = position - (context_len - query_len)
            if 0 <= row < query_len:
                rows[row] = torch.tensor([start, end])
    return rows


def prefill_case(heads=(4, 2), dim=16):
    hq, hk = heads
    qs = [torch.randn(t, hq, dim) for t, _, _ in SEQUENCES]
    ks = [torch.randn(length, hk, dim) for _, length, _ in SEQUENCES]
    vs = [torch.randn(length, hk, dim) for _, length, _ in SEQUENCES]
    spans = torch.cat([spans_tensor(t, length, s) for t, length, s in SEQUENCES])
    k_cache, tables = paged(ks)
    v_cache, _ = paged(vs)
    # both caches must use one table: rewrite v into k's layout
    for s, context in enumerate(vs):
        for p in range(len(context)):
            v_cache[tables[s, p // BLOCK], p % BLOCK] = context[p].to(DEVICE)
    starts = torch.tensor([0, *itertools.accumulate(t for t, _, _ in SEQUENCES)], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([length for _, length, _ in SEQUENCES], dtype=torch.int32, device=DEVICE)
    return qs, ks, vs, spans, (k_cache, v_cache, tables, starts, lens)


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("with_spans", [False, True])
def test_torch_prefill_masks_match_the_formula(window, with_spans):
    torch.manual_seed(0)
    qs, ks, vs, spans, (k_cache, v_cache, tables, starts, lens) = prefill_case()
    out = torch_attn.paged_prefill_attention(
        torch.cat(qs).to(DEVICE),
        k_cache,
        v_cache,
        tables,
        starts,
        lens,
        0.25,
        sliding_window=window,
        query_spans=spans.to(DEVICE) if with_spans else None,
    ).cpu()
    offset = 0
    for (t, _, _), q, k, v in zip(SEQUENCES, qs, ks, vs):
        rows = spans[offset : offset + t] if with_spans else None
        torch.testing.assert_close(out[offset : offset + t], naive(q, k, v, rows, window, 0.25), atol=1e-5, rtol=1e-5)
        offset += t


def test_spans_and_window_change_the_result():
    """The masks are not no-ops on these shapes (so the comparisons above test something)."""
    torch.manual_seed(0)
    qs, _, _, spans, (k_cache, v_cache, tables, starts, lens) = prefill_case()
    q = torch.cat(qs).to(DEVICE)
    plain = torch_attn.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.25)
    spanned = torch_attn.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.25, query_spans=spans)
    windowed = torch_attn.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.25, sliding_window=3)
    assert (plain - spanned).abs().max() > 0.1 and (plain - windowed).abs().max() > 0.1


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_spans", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_triton_prefill_masks_match_torch(ta, window, with_spans, heads):
    torch.manual_seed(0)
    qs, _, _, spans, (k_cache, v_cache, tables, starts, lens) = prefill_case(heads, dim=24)
    q = torch.cat(qs).to(DEVICE)
    masks = dict(sliding_window=window, query_spans=spans.to(DEVICE) if with_spans else None)
    want = torch_attn.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.25, **masks)
    got = ta.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, 0.25, block_m=16, block_n=16, **masks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 40])
def test_decode_window(ta, window):
    """torch decode against the formula, Triton decode against torch (also with split-K slices)."""
    torch.manual_seed(0)
    lengths = [1, 7, 19, 33]
    ks = [torch.randn(n, 2, 16) for n in lengths]
    vs = [torch.randn(n, 2, 16) for n in lengths]
    k_cache, tables = paged(ks)
    v_cache = k_cache.clone()
    for s, context in enumerate(vs):
        for p in range(len(context)):
            v_cache[tables[s, p // BLOCK], p % BLOCK] = context[p].to(DEVICE)
    q = torch.randn(len(lengths), 4, 16).to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    want = torch_attn.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3, sliding_window=window)
    for s in range(len(lengths)):
        expected = naive(q[s : s + 1].cpu(), ks[s], vs[s], None, window, 0.3)[0]
        torch.testing.assert_close(want[s].cpu(), expected, atol=1e-5, rtol=1e-5)
    for splits in (1, 3):
        got = ta.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, 0.3, block_n=16, num_splits=splits, sliding_window=window
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Scheduler and validation
# --------------------------------------------------------------------------


def sequence(length: int, spans) -> Sequence:
    inputs = ModelInputs(token_ids=list(range(1, length + 1)), bidirectional_spans=spans)
    return Sequence(request_id=str(length), inputs=inputs, params=SamplingParams(max_tokens=4), detokenizer=None)  # type: ignore[arg-type]


def chunks(scheduler: Scheduler, seq: Sequence) -> list[tuple[int, int]]:
    """Run the scheduler alone on ``seq`` until its prompt is computed; the (start, end) of each chunk."""
    scheduler.add(seq)
    done = []
    while seq.num_computed < seq.num_tokens:
        step = scheduler.schedule()
        for s, count in step.prefills:
            done.append((s.num_computed, s.num_computed + count))
            s.num_computed += count
        for s in step.decodes:
            done.append((s.num_computed, s.num_computed + 1))
            s.num_computed += 1
    return done


def test_chunks_end_before_a_span_and_a_long_span_runs_whole():
    scheduler = Scheduler(BlockAllocator(64), BLOCK, max_num_seqs=4, max_num_batched_tokens=8)
    # a span across the first budget boundary; one longer than the budget; a tail
    assert chunks(scheduler, sequence(40, [(6, 10), (12, 25)])) == [(0, 6), (6, 12), (12, 25), (25, 33), (33, 40)]


def test_a_cached_prefix_never_ends_inside_a_span():
    allocator = BlockAllocator(64)
    scheduler = Scheduler(allocator, BLOCK, max_num_seqs=4, max_num_batched_tokens=64)
    first = sequence(30, [(6, 14)])
    chunks(scheduler, first)
    scheduler.register_full_blocks([first])
    # same tokens: blocks end at 4, 8, 12, ...; 8 and 12 fall inside (6, 14), so the reuse stops at 4
    second = sequence(30, [(6, 14)])
    second.inputs.token_ids = list(first.inputs.token_ids)
    scheduler.add(second)
    scheduler.schedule()
    assert second.num_computed in (4, 16, 28) and not 6 < second.num_computed < 14
    assert second.num_computed == 28  # everything up to the last full block: past the span, allowed
    third = sequence(30, [(2, 29)])  # a span covering the reusable blocks: nothing may be taken
    third.inputs.token_ids = list(first.inputs.token_ids)
    scheduler.add(third)
    scheduler.schedule()
    assert third.num_computed == 0


@pytest.mark.parametrize(
    "spans", [[(3, 2)], [(0, 4), (3, 6)], [(5, 11)], [(-1, 2)], [(4, 6), (0, 2)], [("a", 2)], [(1, 2, 3)]]
)
def test_bad_spans_are_refused_in_one_line(spans):
    with pytest.raises(InputError, match="bidirectional span") as error:
        check_bidirectional_spans(ModelInputs(token_ids=list(range(10)), bidirectional_spans=spans))
    assert "\n" not in str(error.value)
