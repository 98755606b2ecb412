import pytest

from prunq.core.errors import PrunqError
from prunq.prune.schedules import Schedule


def test_one_shot():
    s = Schedule("one_shot", 0.9, begin=3, end=10)
    assert s.update_steps() == [3]
    assert s.target(2) == 0.0 and s.target(3) == 0.9


def test_iterative_geometric_kept_fraction():
    s = Schedule("iterative", 0.99, begin=0, end=40, iterations=4)
    assert s.update_steps() == [0, 10, 20, 30]
    # s_k = 1 - 0.01^(k/4): 1 - 0.3162, 1 - 0.1, 1 - 0.03162, 1 - 0.01
    assert [round(s.target(t), 4) for t in (0, 10, 20, 30)] == [0.6838, 0.9, 0.9684, 0.99]


def test_gradual_cubic():
    s = Schedule("gradual", 0.8, begin=10, end=110, frequency=25, initial_sparsity=0.0)
    assert s.update_steps() == [10, 35, 60, 85, 110]
    # s_t = 0.8 + (0 - 0.8)(1 - (t - 10)/100)^3; t = 60: 0.8 - 0.8 * 0.125 = 0.7
    assert s.target(60) == pytest.approx(0.7)
    assert s.target(110) == pytest.approx(0.8)
    assert s.target(10) == pytest.approx(0.0)
    s2 = Schedule("gradual", 0.8, begin=0, end=10, frequency=4)
    assert s2.update_steps() == [0, 4, 8, 10]


@pytest.mark.parametrize(
    "kw, field",
    [(dict(kind="cubic", sparsity=0.5), "prune.schedule"), (dict(kind="one_shot", sparsity=1.0), "prune.sparsity"),
     (dict(kind="gradual", sparsity=0.5, begin=5, end=2), "prune.end")],
)  # fmt: skip
def test_bad_schedules(kw, field):
    with pytest.raises(PrunqError, match=field):
        Schedule(**kw)
