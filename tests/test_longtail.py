import numpy as np
import pytest

from train.data.longtail import group_accuracy, longtail_counts, select_longtail, shot_groups
from expertfuse.errors import UserError


@pytest.mark.parametrize("imb, total", [(100, 10_847), (50, 12_608), (10, 19_573)])
def test_cifar100_lt_totals(imb, total):
    counts = longtail_counts(500, 100, imb)
    assert sum(counts) == total
    assert counts[0] == 500 and counts[-1] == int(500 / imb)


@pytest.mark.parametrize("imb, rule, expected", [
    (100, "strict", (35, 35, 30)), (100, "ncl", (35, 34, 31)), (50, "strict", (41, 41, 18)), (10, "strict", (69, 31, 0)),
])
def test_shot_groups_of_cifar100_lt(imb, rule, expected):
    groups = shot_groups(longtail_counts(500, 100, imb), rule)
    assert (len(groups["many"]), len(groups["medium"]), len(groups["few"])) == expected


def test_step_profile():
    assert longtail_counts(100, 4, 10, "step") == [100, 100, 10, 10]


def test_subset_modes():
    targets = [0, 1, 0, 1, 0, 1, 0, 1]
    first = select_longtail(targets, [3, 1], mode="first")
    assert first == [0, 2, 4, 1]
    shuffled = select_longtail(targets, [3, 1], mode="shuffle", seed=0)
    assert sorted(np.asarray(targets)[shuffled].tolist()) == [0, 0, 0, 1]
    assert shuffled == select_longtail(targets, [3, 1], mode="shuffle", seed=0)
    with pytest.raises(UserError, match="class 1 has 4 images"):
        select_longtail(targets, [1, 5])


def test_group_accuracy_strict_is_class_mean_and_ncl_is_sample_weighted():
    counts = [200, 50, 20]  # strict: many, medium, medium(20 is not < 20); ncl: many, medium, few
    correct, total = np.array([10, 1, 3]), np.array([10, 4, 10])
    strict = group_accuracy(correct, total, counts, "strict")
    assert strict["many"] == 100 and strict["medium"] == pytest.approx((25 + 30) / 2) and np.isnan(strict["few"])
    ncl = group_accuracy(correct, total, counts, "ncl")
    assert ncl["few"] == pytest.approx(30) and ncl["overall"] == pytest.approx(100 * 14 / 24)
