import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmdgen.model.patterns import PATTERNS, Pattern, decoding_steps, make_pattern

S_ = 99  # special token in the hand-written layouts


def _readable_codes(k: int, t: int) -> torch.Tensor:
    # Code 10*k + t: the digit pair says (codebook, frame) at a glance.
    return (10 * torch.arange(k)[:, None] + torch.arange(t)[None, :])[None]


CASES = [
    (name, k, t, delays)
    for name in PATTERNS
    for k in (1, 4)
    for t in (1, 7)
    for delays in ([None, (0,) * k] if name == "delay" else [None])
] + [("delay", 4, 7, (0, 2, 3, 5)), ("delay", 4, 1, (5, 0, 3, 2)), ("delay", 3, 7, (2, 2, 2))]


@pytest.mark.parametrize("name,k,t,delays", CASES)
def test_round_trip_and_mask(name, k, t, delays):
    pattern = make_pattern(name, k, delays)
    codes = torch.randint(0, 2048, (3, k, t))
    seq = pattern.build(codes, special_token=2048)
    s = pattern.num_steps(t)
    assert seq.shape == (3, k, s)
    assert torch.equal(pattern.revert(seq), codes)
    mask = pattern.valid_mask(t)
    assert mask.shape == (k, s) and mask.dtype == torch.bool
    assert int(mask.sum()) == k * t
    # The special token sits exactly where the mask is False (codes never reach 2048).
    assert torch.equal(seq == 2048, (~mask).expand(3, k, s))
    frame_index = pattern.frame_index(t)
    assert torch.equal(frame_index >= 0, mask)
    # Each valid cell carries the code of the frame the index map names.
    rows = torch.arange(k)[:, None].expand(k, s)
    assert torch.equal(codes[:, rows[mask], frame_index[mask]], seq[:, mask])


@pytest.mark.parametrize(
    "name,delays,expected",
    [
        ("parallel", None, lambda k, t: t),
        ("delay", None, lambda k, t: t + k - 1),
        ("delay", "custom", lambda k, t: t + 5),
        ("flatten", None, lambda k, t: k * t),
        ("valle", None, lambda k, t: 2 * t),
    ],
)
def test_step_counts_and_inverse(name, delays, expected):
    for k in (1, 2, 4):
        custom = tuple(range(k - 1)) + (5,)
        pattern = make_pattern(name, k, custom if delays == "custom" else None)
        for t in (0, 1, 7, 500):
            s = pattern.num_steps(t)
            assert s == expected(k, t)
            assert pattern.frames_for_steps(s) == t


def test_paper_decoding_step_counts():
    # 10 s at 50 frames/s with K=4 (the numbers the experiment reports).
    assert decoding_steps("delay", 4, 500) == 503
    assert decoding_steps("flatten", 4, 500) == 2000
    assert decoding_steps("parallel", 4, 500) == 500
    assert decoding_steps("valle", 4, 500) == 1000


def test_delay_layout_by_hand():
    seq = make_pattern("delay", 3).build(_readable_codes(3, 4), special_token=S_)
    expected = torch.tensor(
        [
            [0, 1, 2, 3, S_, S_],
            [S_, 10, 11, 12, 13, S_],
            [S_, S_, 20, 21, 22, 23],
        ]
    )
    assert torch.equal(seq[0], expected)


def test_custom_delay_layout_by_hand():
    seq = make_pattern("delay", 3, (0, 2, 1)).build(_readable_codes(3, 2), special_token=S_)
    expected = torch.tensor(
        [
            [0, 1, S_, S_],
            [S_, S_, 10, 11],
            [S_, 20, 21, S_],
        ]
    )
    assert torch.equal(seq[0], expected)


def test_flatten_layout_by_hand():
    seq = make_pattern("flatten", 2).build(_readable_codes(2, 3), special_token=S_)
    expected = torch.tensor(
        [
            [0, S_, 1, S_, 2, S_],
            [S_, 10, S_, 11, S_, 12],
        ]
    )
    assert torch.equal(seq[0], expected)


def test_valle_layout_by_hand():
    seq = make_pattern("valle", 3).build(_readable_codes(3, 2), special_token=S_)
    expected = torch.tensor(
        [
            [0, 1, S_, S_],
            [S_, S_, 10, 11],
            [S_, S_, 20, 21],
        ]
    )
    assert torch.equal(seq[0], expected)


def test_parallel_layout_and_frame_index():
    pattern = make_pattern("parallel", 2)
    codes = _readable_codes(2, 3)
    assert torch.equal(pattern.build(codes, special_token=S_), codes)
    delay = make_pattern("delay", 2)
    assert torch.equal(delay.frame_index(3), torch.tensor([[0, 1, 2, -1], [-1, 0, 1, 2]]))
    assert torch.equal(delay.step_index(3), torch.tensor([[0, 1, 2], [1, 2, 3]]))


@pytest.mark.parametrize("name", PATTERNS)
def test_revert_takes_trailing_dims_along(name):
    k, t, v = 3, 5, 6
    pattern = make_pattern(name, k)
    s = pattern.num_steps(t)
    logits = torch.randn(2, k, s, v)
    out = pattern.revert(logits)
    assert out.shape == (2, k, t, v)
    steps = pattern.step_index(t)
    for kk in range(k):
        for tt in range(t):
            assert torch.equal(out[:, kk, tt], logits[:, kk, steps[kk, tt]])
    # Consistent with reverting a built integer sequence position by position.
    positions = torch.arange(k * s).view(1, k, s)
    expected = pattern.revert(positions)
    flat = logits.reshape(2, k * s, v)
    assert torch.equal(out, flat[:, expected[0].reshape(-1)].view(2, k, t, v))


def test_default_delays_normalised_and_hashable():
    assert Pattern("delay", 3) == make_pattern("delay", 3, [0, 1, 2])
    assert Pattern("delay", 3).delays == (0, 1, 2)
    assert make_pattern("flatten", 2).delays is None
    assert len({Pattern("delay", 3), make_pattern("delay", 3, (0, 1, 2))}) == 1


def test_public_index_maps_are_copies():
    pattern = make_pattern("delay", 2)
    pattern.frame_index(3).fill_(7)
    pattern.step_index(3).fill_(7)
    assert pattern.frame_index(3)[0, 0] == 0
    codes = _readable_codes(2, 3)
    assert torch.equal(pattern.revert(pattern.build(codes, S_)), codes)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: make_pattern("interleave", 4),
            r"unknown pattern 'interleave'.*parallel, delay, flatten, valle",
        ),
        (lambda: make_pattern("delay", 0), r"num_codebooks must be >= 1, got 0"),
        (lambda: make_pattern("flatten", 4, (0, 1, 2, 3)), r"'flatten' takes no delays"),
        (lambda: make_pattern("parallel", 2, (0, 0)), r"pattern 'parallel' takes no delays"),
        (lambda: make_pattern("delay", 4, (0, 1, 2)), r"length 3; .*must equal num_codebooks K=4"),
        (lambda: make_pattern("delay", 3, (0, -1, 2)), r"delays=\(0, -1, 2\) must all be >= 0"),
        (lambda: make_pattern("delay", 2, (0, 1.5)), r"each delay must be an integer, got 1.5"),
        (
            lambda: make_pattern("delay", 4).build(torch.zeros(2, 3, 5, dtype=torch.long), 2048),
            r"codes must have shape \[B, K, T\] with K=4 .*got shape \(2, 3, 5\)",
        ),
        (
            lambda: make_pattern("delay", 4).build(torch.zeros(4, 5, dtype=torch.long), 2048),
            r"codes must have shape \[B, K, T\] with K=4 .*got shape \(4, 5\)",
        ),
        (
            lambda: make_pattern("delay", 4).build(torch.zeros(1, 4, 5, dtype=torch.long), -1),
            r"special_token must be >= 0, got -1",
        ),
        (
            lambda: make_pattern("flatten", 4).revert(torch.zeros(1, 4, 7)),
            r"S=7 steps is not a whole number of frames for pattern 'flatten' with K=4; "
            r"expected a multiple of K=4",
        ),
        (
            lambda: make_pattern("valle", 2).revert(torch.zeros(1, 2, 5)),
            r"S=5 steps .*expected an even number",
        ),
        (
            lambda: make_pattern("delay", 4).revert(torch.zeros(1, 4, 2)),
            r"S=2 steps .*'delay'.*expected S >= max\(delays\) = 3",
        ),
        (
            lambda: make_pattern("delay", 4).revert(torch.zeros(1, 3, 9)),
            r"sequence must have shape \[B, K, S, \.\.\.\] with K=4 .*got shape \(1, 3, 9\)",
        ),
        (lambda: make_pattern("parallel", 2).num_steps(-1), r"frames must be >= 0, got -1"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_property(data):
    name = data.draw(st.sampled_from(PATTERNS))
    k = data.draw(st.integers(1, 6))
    t = data.draw(st.integers(0, 12))
    delays = None
    if name == "delay" and data.draw(st.booleans()):
        delays = data.draw(st.lists(st.integers(0, 6), min_size=k, max_size=k))
    pattern = make_pattern(name, k, delays)
    codes = torch.randint(0, 16, (data.draw(st.integers(1, 3)), k, t))
    seq = pattern.build(codes, special_token=16)
    assert seq.shape[-1] == pattern.num_steps(t)
    assert pattern.frames_for_steps(seq.shape[-1]) == t
    assert torch.equal(pattern.revert(seq), codes)
    mask = pattern.valid_mask(t)
    assert int(mask.sum()) == k * t
    assert torch.equal(seq != 16, mask.expand_as(seq))
    # No step holds two frames of one codebook and every (codebook, frame) lands somewhere once.
    steps = pattern.step_index(t)
    for row in steps:
        assert row.unique().numel() == t
