import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_xpo_plugin.loop.schedule import get_current_alpha


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
