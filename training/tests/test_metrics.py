import numpy as np
import pytest

from adserve_trainer import TrainerError
from adserve_trainer import metrics as M


def test_weights_equal_repeated_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 2)  # ties too
    w = rng.integers(1, 4, 200)
    yr, pr = np.repeat(y, w), np.repeat(p, w)
    assert M.auc(y, p, w) == pytest.approx(M.auc(yr, pr))
    assert M.logloss(y, p, w) == pytest.approx(M.logloss(yr, pr))
    assert M.base_rate(y, w) == pytest.approx(yr.mean())
    assert M.normalized_entropy(y, p, w) == pytest.approx(M.normalized_entropy(yr, pr))


def test_auc_is_the_pair_ordering_probability():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 5, 60).astype(float)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert M.auc(y, s) == pytest.approx(pairs)
    with pytest.raises(TrainerError, match="one class"):
        M.auc(np.zeros(5), np.arange(5.0))


def test_normalized_entropy_of_the_base_rate_is_one():
    y = np.array([0] * 96 + [1] * 4)
    assert M.normalized_entropy(y, np.full(100, 0.04)) == pytest.approx(1.0)
    assert M.entropy(0.04) == pytest.approx(-(0.04 * np.log(0.04) + 0.96 * np.log(0.96)))


def test_ece_uses_equal_mass_bins():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.0, 0.2, 200_000)
    y = (rng.random(p.size) < p).astype(int)
    assert M.ece(y, p) < 0.003  # calibrated
    assert M.ece(y, np.clip(p * 1.5, 0, 1)) > 0.04  # over-predicts by half
    r = M.reliability(y, p)
    assert len(r["weight_share"]) == M.ECE_BINS
    np.testing.assert_allclose(r["weight_share"], 0.1, atol=1e-4)
    assert r["mean_predicted"] == sorted(r["mean_predicted"])
    # With weights the bins hold equal WEIGHT, not equal counts.
    w = np.where(p < 0.1, 3.0, 1.0)
    np.testing.assert_allclose(M.reliability(y, p, w)["weight_share"], 0.1, atol=1e-4)
