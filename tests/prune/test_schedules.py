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


def test_schedule_kinds_are_registered_and_the_config_uses_the_same_rules():
    from prunq.prune.pruner import PruneConfig
    from prunq.prune.schedules import SCHEDULES

    assert list(SCHEDULES) == ["one_shot", "iterative", "gradual"]
    for kind in SCHEDULES:
        assert PruneConfig(schedule=kind).schedule == kind
    # one rule, one message: the Schedule (steps) and the config (fractions) raise the same words
    with pytest.raises(PrunqError, match=r"prune.end: begin \(5\) is after end \(2\)"):
        Schedule("gradual", 0.5, begin=5, end=2)
    with pytest.raises(PrunqError, match=r"prune.end: begin \(0.5\) is after end \(0.2\)"):
        PruneConfig(begin=0.5, end=0.2)
    with pytest.raises(PrunqError, match=r"prune.begin: -1 is negative"):
        Schedule("gradual", 0.5, begin=-1, end=2)
    with pytest.raises(PrunqError, match=r"prune.initial_sparsity: 0.6 must be in \[0, sparsity = 0.5\]"):
        Schedule("gradual", 0.5, initial_sparsity=0.6)
    with pytest.raises(PrunqError, match=r"prune.initial_sparsity: 0.6 must be in \[0, sparsity = 0.5\]"):
        PruneConfig(sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(PrunqError, match="prune.frequency: 0 must be an integer >= 1"):
        Schedule("gradual", 0.5, frequency=0)
    with pytest.raises(PrunqError, match="prune.frequency: 0 must be an integer >= 1"):
        PruneConfig(frequency=0)


def test_gradual_target_before_begin_is_the_initial_sparsity():
    s = Schedule("gradual", 0.8, begin=10, end=20, frequency=5, initial_sparsity=0.2)
    assert s.target(0) == 0.2 and Schedule("iterative", 0.8, begin=10, end=20).target(0) == 0.0
