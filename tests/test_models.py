"""Model math against direct reference computations on tiny inputs."""

import itertools

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys.config import Pooling, Task
from recsys.features import FeatureSpec
from recsys.models import FM, LR, MLP, DeepFM, fm_pairwise, table_width

SPEC = FeatureSpec("y", Task.binary, ("x0", "x1"), (("a", 10), ("b", 7), ("tags", 5)))


def tiny_batch():
    dense = torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 1.5]])
    # a: one id per row; b: one id or none; tags: multi-hot lists of 0..2 ids
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "tags"],
        values=torch.tensor([1, 9, 3, 6, 0, 2, 4, 4]),
        lengths=torch.tensor([1, 1, 1, 1, 0, 1, 2, 1, 0]),
    )
    return dense, kjt


def table(model, name):
    return model.ebc.embedding_bags[f"t_{name}"].weight.detach()


def fields_by_hand(model, dense, k):
    """Per row: list of field vectors and the sum of first-order weights, from the raw tables."""
    ids = {"a": [[1], [9], [3]], "b": [[6], [], [0]], "tags": [[2, 4], [4], []]}
    rows = []
    for r in range(dense.shape[0]):
        vecs, first = [], model.linear(dense[r : r + 1]).squeeze().item()
        for name in ["a", "b", "tags"]:
            t = table(model, name)
            v = sum((t[i, :k] for i in ids[name][r]), torch.zeros(k))
            first += sum(t[i, k].item() for i in ids[name][r])
            vecs.append(v)
        for d in range(dense.shape[1]):
            vecs.append(dense[r, d] * model.dense_vectors[d].detach())
        rows.append((vecs, first))
    return rows


def test_sum_square_trick_equals_explicit_pairwise_sum():
    fields = torch.randn(4, 6, 3)
    explicit = torch.stack(
        [
            sum(fields[b, i] @ fields[b, j] for i, j in itertools.combinations(range(6), 2))
            for b in range(4)
        ]
    )
    torch.testing.assert_close(fm_pairwise(fields), explicit)


@pytest.mark.parametrize(
    "dim,first,width", [(16, True, 20), (16, False, 16), (10, True, 12), (0, True, 4)]
)
def test_table_width_is_a_multiple_of_4(dim, first, width):
    assert table_width(dim, first) == width


def test_fm_forward_matches_reference():
    torch.manual_seed(0)
    model = FM(SPEC, embedding_dim=4, pooling=Pooling.sum, init_std=0.3, device="cpu")
    dense, kjt = tiny_batch()
    expected = []
    for vecs, first in fields_by_hand(model, dense, 4):
        pair = sum(vecs[i] @ vecs[j] for i, j in itertools.combinations(range(len(vecs)), 2))
        expected.append(first + pair)
    torch.testing.assert_close(model(dense, kjt), torch.stack(expected).float())


def test_deepfm_is_fm_plus_dnn_over_the_same_embeddings():
    torch.manual_seed(0)
    model = DeepFM(
        SPEC, 4, Pooling.sum, 0.3, hidden=[8], dropout=0.0, batch_norm=False, device="cpu"
    ).eval()
    dense, kjt = tiny_batch()
    out = model(dense, kjt)
    fm_part, deep_in = [], []
    for vecs, first in fields_by_hand(model, dense, 4):
        pair = sum(vecs[i] @ vecs[j] for i, j in itertools.combinations(range(len(vecs)), 2))
        fm_part.append(first + pair)
        deep_in.append(torch.cat(vecs))
    expected = torch.stack(fm_part).float() + model.dnn(torch.stack(deep_in)).squeeze(-1)
    torch.testing.assert_close(out, expected)
    # one set of tables serves both parts
    assert len(list(model.ebc.embedding_bags)) == 3
    assert sum("embedding" in n for n, _ in model.named_parameters()) == 3


def test_lr_is_first_order_only():
    torch.manual_seed(0)
    model = LR(SPEC, 0, Pooling.sum, 0.3, device="cpu")
    dense, kjt = tiny_batch()
    expected = [first for _, first in fields_by_hand_lr(model, dense)]
    torch.testing.assert_close(model(dense, kjt), torch.tensor(expected))


def fields_by_hand_lr(model, dense):
    ids = {"a": [[1], [9], [3]], "b": [[6], [], [0]], "tags": [[2, 4], [4], []]}
    for r in range(dense.shape[0]):
        first = model.linear(dense[r : r + 1]).squeeze().item()
        first += sum(table(model, n)[i, 0].item() for n in ids for i in ids[n][r])
        yield None, first


def test_mean_pooling_averages_multi_hot_ids():
    torch.manual_seed(0)
    model = MLP(SPEC, 4, Pooling.mean, 0.3, hidden=[8], dropout=0.0, batch_norm=False, device="cpu")
    _, kjt = tiny_batch()
    vectors, bias = model.embed(kjt)
    assert bias is None
    t = table(model, "tags")
    torch.testing.assert_close(vectors[0, 2], (t[2, :4] + t[4, :4]) / 2)
