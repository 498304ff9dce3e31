"""Two-tower retrieval: model, loss and metrics against direct computations on tiny inputs."""

import math
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from recsys import config as schema
from recsys.config import LabelKind, Pooling, RetrievalConfig
from recsys.data.features import FeatureSpec
from recsys.demo.interactions import InteractionSpec
from recsys.errors import ConfigError
from recsys.retrieval import Corpus, Retrieval, cat_rows, take_rows
from recsys.retrieval_metrics import RankMetrics, corpus_ranks, popularity_ranks
from recsys.two_tower import TwoTower, in_batch_softmax_loss
from tests.conftest import compose_cfg

SPEC = FeatureSpec(
    "click",
    LabelKind.binary,
    ("age", "price"),
    (("user", 10), ("interests", 6), ("item", 8), ("tags", 5)),
)
TOWERS = {"user_features": ["user", "interests", "age"], "item_features": ["item", "tags", "price"]}


def two_tower(**overrides) -> TwoTower:
    args = dict(
        features=SPEC,
        embedding_dim=4,
        pooling=Pooling.mean,
        init_std=0.3,
        hidden=[8],
        dropout=0.0,
        batch_norm=False,
        user_id="user",
        item_id="item",
        output_dim=6,
        temperature=0.1,
        device="cpu",
    )
    return TwoTower(**(args | TOWERS | overrides)).eval()


def tiny_batch(items=(1, 4, 1, 7), labels=(1.0, 1.0, 0.0, 1.0)) -> Batch:
    """Four rows: user, interests (multi-hot), item, tags (multi-hot)."""
    n = len(items)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "interests", "item", "tags"],
        values=torch.tensor([3, 5, 3, 9, 0, 2, 2, 1, *items, 4, 0, 1, 4]),
        lengths=torch.tensor([1] * n + [1, 2, 0, 1] + [1] * n + [1, 2, 0, 1]),
    )
    dense = torch.tensor([[30.0, 2.5], [41.0, 1.0], [30.0, 2.5], [25.0, 9.0]])
    return Batch(dense, sparse, torch.tensor(labels))


def test_in_batch_softmax_with_logq_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    users = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    items = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    ids = torch.tensor([7, 2, 7, 5])  # rows 0 and 2 hold the same item: an accidental hit
    log_q = torch.log(torch.tensor([0.5, 0.1, 0.5, 0.2]))
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])  # row 2 is only a negative for the others
    t = 0.1

    def direct(correct: bool, mask: bool) -> torch.Tensor:
        losses = []
        for i in range(4):
            logit = [users[i] @ items[j] / t - (log_q[j] if correct else 0) for j in range(4)]
            negatives = [j for j in range(4) if j != i and not (mask and ids[j] == ids[i])]
            denominator = torch.logsumexp(
                torch.stack([logit[i]] + [logit[j] for j in negatives]), 0
            )
            losses.append(denominator - logit[i])
        return sum(w * x for w, x in zip(weights, losses, strict=True)) / weights.sum()

    got = in_batch_softmax_loss(users, items, ids, t, log_q, weights)
    torch.testing.assert_close(got, direct(correct=True, mask=True))
    plain = in_batch_softmax_loss(users, items, ids, t, None, weights, remove_accidental_hits=False)
    torch.testing.assert_close(plain, direct(correct=False, mask=False))
    assert not torch.isclose(got, plain)


def test_training_loss_corrects_by_the_train_frequency_of_each_item():
    model = two_tower()
    batch = tiny_batch()
    corpus = Corpus.scan({"train": [batch, tiny_batch(items=(1, 1, 4, 2))]}, SPEC, SPEC, "item", 3)
    assert corpus.ids.tolist() == [1, 2, 4, 7]
    assert corpus.sampled[[1, 2, 4, 7]].tolist() == [4, 1, 2, 1]
    assert corpus.clicked[[1, 2, 4, 7]].tolist() == [3, 1, 1, 1]  # row 2 of each batch is a 0
    task = Retrieval(model, corpus, RetrievalConfig(top_k=[3]))
    users, items = model(batch.dense_features, batch.sparse_features, vectors=True)
    q = torch.tensor([4, 2, 4, 1]) / 8.0  # frequency of the batch's items (1, 4, 1, 7)
    expected = in_batch_softmax_loss(
        users, items, torch.tensor([1, 4, 1, 7]), 0.1, q.log(), batch.labels
    )
    torch.testing.assert_close(task.loss(model, batch), expected)


def test_towers_see_only_their_own_columns_and_give_unit_vectors():
    model = two_tower()
    a, b = tiny_batch(), tiny_batch(items=(0, 2, 3, 5))
    b.dense_features[:, 1] += 10.0  # price: an item column
    ua, va = model(a.dense_features, a.sparse_features, vectors=True)
    ub, vb = model(b.dense_features, b.sparse_features, vectors=True)
    torch.testing.assert_close(ua, ub)
    assert not torch.allclose(va, vb)
    torch.testing.assert_close(ua.norm(dim=1), torch.ones(4))
    logits = model(a.dense_features, a.sparse_features)
    torch.testing.assert_close(logits, (ua * va).sum(1) / 0.1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"user_features": ["user", "interests", "age", "nope"]}, "model.user_features names"),
        ({"item_features": ["item", "tags"]}, "data column(s) ['price'] are in neither"),
        ({"item_features": ["item", "tags", "price", "age"]}, "['age'] are in both"),
        ({"item_id": "tags", "item_features": ["tags", "item", "price"]}, None),
        ({"item_id": "price"}, "model.item_id=price must be a categorical column"),
        ({"user_id": "item"}, "model.user_id=item must be a categorical column in model.user_f"),
    ],
)
def test_tower_columns_are_checked_against_the_data(overrides, message):
    if message is None:
        two_tower(**overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        two_tower(**overrides)


def test_corpus_ranks_match_a_full_sort_with_ties_broken_by_position():
    g = torch.Generator().manual_seed(0)
    corpus = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    corpus[[10, 30]] = corpus[3].clone()  # identical items tie
    queries = F.normalize(torch.randn(20, 8, generator=g), dim=1)
    positions = torch.randint(0, 50, (20,), generator=g)
    positions[:3] = torch.tensor([3, 10, 30])
    queries[1:3] = queries[0].clone()  # one query, its three tied items
    got = corpus_ranks(queries, corpus, positions, budget=7 * 20)  # slabs of 7 rows
    scores = queries.double() @ corpus.double().T
    for i, p in enumerate(positions.tolist()):
        s = scores[i]
        ahead = [j for j in range(50) if s[j] > s[p] + 1e-9 or (abs(s[j] - s[p]) <= 1e-9 and j < p)]
        assert got[i] == len([j for j in ahead if j != p])
    assert got[1] == got[0] + 1 and got[2] == got[0] + 2


def test_recall_and_ndcg_from_ranks():
    m = RankMetrics((1, 10))
    m.add(np.array([0, 4, 9]))
    m.add(np.array([10, 100]))
    r = m.result("x_")
    assert r["x_recall@1"] == pytest.approx(1 / 5)
    assert r["x_recall@10"] == pytest.approx(3 / 5)
    assert r["x_ndcg@1"] == pytest.approx(1 / 5)
    ndcg = (1 + 1 / math.log2(6) + 1 / math.log2(11)) / 5
    assert r["x_ndcg@10"] == pytest.approx(ndcg)


def test_popularity_order_breaks_ties_by_id():
    assert popularity_ranks(np.array([5, 9, 5, 0])).tolist() == [1, 0, 2, 3]


def test_take_rows_and_cat_rows_keep_every_key_of_each_row():
    kjt = tiny_batch().sparse_features
    picked = take_rows(kjt, torch.tensor([3, 1]))
    assert [t.tolist() for t in picked.to_dict()["interests"].to_dense()] == [[1], [2, 2]]
    assert picked["item"].values().tolist() == [7, 4]
    both = cat_rows([kjt, picked])
    assert both.stride() == 6
    tags = [t.tolist() for t in both.to_dict()["tags"].to_dense()]
    assert tags == [[4], [0, 1], [], [4], [4], [0, 1]]


def test_interaction_data_config_matches_the_generator():
    typed = schema.to_object(compose_cfg("model=two_tower"))
    assert typed.data.path.endswith("interactions-v1")
    assert typed.data.tables == InteractionSpec().categorical
    assert set(typed.data.dense) == {"user_age", "item_price"}
