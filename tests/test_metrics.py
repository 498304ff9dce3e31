import itertools

import numpy as np
import pytest

from recsys.config import LabelKind
from recsys.metrics import binary_auc, compute


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    assert binary_auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)


def test_binary_metrics_against_direct_formulas():
    logits = np.array([2.0, -1.0, 0.5, -3.0])
    labels = np.array([1.0, 0.0, 0.0, 1.0])
    p = 1 / (1 + np.exp(-logits))
    logloss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    m = compute(LabelKind.binary, logits, labels)
    assert m["logloss"] == pytest.approx(logloss)
    assert m["ne"] == pytest.approx(logloss / np.log(2))  # base rate 0.5: entropy ln 2
    assert m["auc"] == pytest.approx(0.5)


def test_regression_metrics():
    m = compute(LabelKind.regression, np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert m["mae"] == pytest.approx(1.0)
