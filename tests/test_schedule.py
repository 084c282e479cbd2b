from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_xpo_plugin.loop.schedule import epoch_of, exact_steps_per_epoch, get_current_alpha


def test_float_is_returned_unchanged():
    for step in (1, 5, 1000):
        assert get_current_alpha(step, 10, 1e-5) == 1e-5


def test_one_entry_per_epoch_with_steps_per_epoch():
    sched = [1e-4, 1e-5, 1e-6]
    got = [get_current_alpha(s, 12, sched, steps_per_epoch=3) for s in range(1, 13)]
    assert got == [1e-4] * 3 + [1e-5] * 3 + [1e-6] * 6  # last entry held to the end


def test_default_split_gives_every_entry_equal_share():
    sched = [3.0, 2.0, 1.0]
    got = [get_current_alpha(s, 9, sched) for s in range(1, 10)]
    assert got == [3.0] * 3 + [2.0] * 3 + [1.0] * 3  # the first entry is not one step short


def test_total_smaller_than_schedule_does_not_divide_by_zero():
    assert get_current_alpha(1, 1, [1.0, 2.0, 3.0]) == 1.0
    assert get_current_alpha(2, 1, [1.0, 2.0, 3.0]) == 2.0


@given(
    st.integers(1, 10_000),
    st.integers(1, 10_000),
    st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=8),
    st.one_of(st.none(), st.integers(1, 500)),
)
def test_any_step_and_total_work_and_value_is_monotone_in_entries(step, total, sched, spe):
    v = get_current_alpha(step, total, sched, spe)
    assert v in sched
    idx = sched.index(v)
    later = get_current_alpha(step + 1, total, sched, spe)
    assert sched.index(later) >= idx or sched.count(later) > 1


def test_empty_schedule_is_an_error():
    with pytest.raises(ValueError):
        get_current_alpha(1, 10, [])


def test_a_float_steps_per_epoch_is_read_exactly():
    """10 prompts, 3 per step: steps 1-4 start in pass 0 (prompts 0, 3, 6, 9), steps 5-7 in pass 1
    (12, 15, 18), step 8 at prompt 21 in pass 2. The float 10 / 3 reads as 10/3, and at the
    boundary (step 11: (11 - 1) / (10/3) = 3 exactly) nothing is rounded down."""
    sched = [0.0, 1.0, 2.0, 3.0, 4.0]
    want = [float(((k - 1) * 3) // 10) for k in range(1, 15)]
    for spe in (10 / 3, Fraction(10, 3)):
        assert [get_current_alpha(k, 14, sched, spe) for k in range(1, 15)] == want
    assert exact_steps_per_epoch(10 / 3) == Fraction(10, 3)
    assert get_current_alpha(11, 14, sched, 10 / 3) == 3.0  # 10 // (10 / 3) is 2.0 in floats


@given(st.integers(1, 5000), st.integers(1, 600), st.integers(1, 400))
def test_float_and_fraction_give_the_epoch_of_the_first_prompt(n_prompts, per_step, step):
    want = ((step - 1) * per_step) // n_prompts
    assert epoch_of(step, 0, 1, Fraction(n_prompts, per_step)) == want
    assert epoch_of(step, 0, 1, n_prompts / per_step) == want


def test_twelve_prompts_three_per_step_switch_at_steps_5_and_9():
    sched = [1.0, 2.0, 3.0]
    got = [get_current_alpha(k, 100, sched, 12 / 3) for k in range(1, 101)]
    assert got.index(2.0) + 1 == 5 and got.index(3.0) + 1 == 9


@pytest.mark.parametrize("bad", [0, -1.5, float("nan"), Fraction(0)])
def test_steps_per_epoch_must_be_positive(bad):
    with pytest.raises(ValueError, match="steps_per_epoch"):
        get_current_alpha(1, 10, [1.0, 2.0], bad)


def test_steps_per_epoch_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match="steps_per_epoch"):
        get_current_alpha(1, 10, [1.0, 2.0], "3")
