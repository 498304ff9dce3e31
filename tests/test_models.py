"""Model math against direct reference computations on tiny inputs."""

import itertools

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys.config import LabelKind, Pooling
from recsys.data.features import FeatureSpec
from recsys.models import (
    DLRM,
    FM,
    LR,
    MLP,
    DCNv2,
    DeepFM,
    Tables,
    fm_pairwise,
    table_width,
    unfold_first_order,
)

SPEC = FeatureSpec("y", LabelKind.binary, ("x0", "x1"), (("a", 10), ("b", 7), ("tags", 5)))


def tables(dim: int, pooling: Pooling = Pooling.sum) -> Tables:
    """The shared constructor arguments of the small models here."""
    return Tables(features=SPEC, embedding_dim=dim, pooling=pooling, init_std=0.3, device="cpu")


def tiny_batch():
    dense = torch.tensor([[0.5, -1.0], [2.0, 0.0], [0.0, 1.5]])
    # a: one id per row; b: one id or none; tags: multi-hot lists of 0..2 ids
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "tags"],
        values=torch.tensor([1, 9, 3, 6, 0, 2, 4, 4]),
        lengths=torch.tensor([1, 1, 1, 1, 0, 1, 2, 1, 0]),
    )
    return dense, kjt


def table(model, name, kind="t"):
    return model.ebc.embedding_bags[f"{kind}_{name}"].weight.detach()


def fields_by_hand(model, dense, k):
    """Per row: list of field vectors and the sum of first-order weights, from the raw tables."""
    ids = {"a": [[1], [9], [3]], "b": [[6], [], [0]], "tags": [[2, 4], [4], []]}
    rows = []
    for r in range(dense.shape[0]):
        vecs, first = [], model.linear(dense[r : r + 1]).squeeze().item()
        for name in ["a", "b", "tags"]:
            t = table(model, name)
            v = sum((t[i, :k] for i in ids[name][r]), torch.zeros(k))
            first += sum(table(model, name, "w")[i, 0].item() for i in ids[name][r])
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


@pytest.mark.parametrize("dim,width", [(16, 16), (10, 12), (1, 4)])
def test_table_width_is_a_multiple_of_4(dim, width):
    assert table_width(dim) == width


def test_fm_forward_matches_reference():
    torch.manual_seed(0)
    model = FM(**tables(4))
    dense, kjt = tiny_batch()
    expected = []
    for vecs, first in fields_by_hand(model, dense, 4):
        pair = sum(vecs[i] @ vecs[j] for i, j in itertools.combinations(range(len(vecs)), 2))
        expected.append(first + pair)
    torch.testing.assert_close(model(dense, kjt), torch.stack(expected).float())


def test_deepfm_is_fm_plus_dnn_over_the_same_embeddings():
    torch.manual_seed(0)
    model = DeepFM(hidden=[8], dropout=0.0, batch_norm=False, **tables(4)).eval()
    dense, kjt = tiny_batch()
    out = model(dense, kjt)
    fm_part, deep_in = [], []
    for vecs, first in fields_by_hand(model, dense, 4):
        pair = sum(vecs[i] @ vecs[j] for i, j in itertools.combinations(range(len(vecs)), 2))
        fm_part.append(first + pair)
        deep_in.append(torch.cat(vecs))
    expected = torch.stack(fm_part).float() + model.dnn(torch.stack(deep_in)).squeeze(-1)
    torch.testing.assert_close(out, expected)
    # one set of tables serves both parts: a vector and a first-order table per column
    assert sorted(model.ebc.embedding_bags) == [
        f"{k}_{n}" for k in "tw" for n in ["a", "b", "tags"]
    ]
    assert sum("embedding" in n for n, _ in model.named_parameters()) == 6


def test_lr_is_first_order_only():
    torch.manual_seed(0)
    model = LR(**tables(0))
    dense, kjt = tiny_batch()
    expected = [first for _, first in fields_by_hand_lr(model, dense)]
    torch.testing.assert_close(model(dense, kjt), torch.tensor(expected))


def fields_by_hand_lr(model, dense):
    ids = {"a": [[1], [9], [3]], "b": [[6], [], [0]], "tags": [[2, 4], [4], []]}
    for r in range(dense.shape[0]):
        first = model.linear(dense[r : r + 1]).squeeze().item()
        first += sum(table(model, n, "w")[i, 0].item() for n in ids for i in ids[n][r])
        yield None, first


def test_mean_pooling_averages_multi_hot_ids():
    torch.manual_seed(0)
    model = MLP(hidden=[8], dropout=0.0, batch_norm=False, **tables(4, Pooling.mean))
    _, kjt = tiny_batch()
    vectors, bias = model.embed(kjt)
    assert bias is None
    t = table(model, "tags")
    torch.testing.assert_close(vectors[0, 2], (t[2, :4] + t[4, :4]) / 2)


def vectors_by_hand(model, kjt):
    """Per row: each categorical feature's vector, summed one id at a time from the raw table."""
    k, ids = model.vector_dim, kjt.to_dict()
    return [
        [sum((table(model, n)[i, :k] for i in ids[n].to_dense()[r]), torch.zeros(k)) for n in ids]
        for r in range(kjt.stride())
    ]


def cross_by_hand(cross, x0):
    """x_{l+1} = x_0 * (W_l x_l + b_l) + x_l for one row, W_l = U_l V_l^T when low-rank."""
    x = x0
    for layer in range(len(cross.bias)):
        if hasattr(cross, "kernels"):
            w = cross.kernels[layer]
        else:
            w = cross.W_kernels[layer] @ cross.V_kernels[layer]
        x = x0 * (w @ x + cross.bias[layer].flatten()) + x
    return x


@pytest.mark.parametrize("low_rank", [None, 3])
@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcn_v2_matches_a_loop_reference(low_rank, structure):
    torch.manual_seed(0)
    model = DCNv2(
        hidden=[8], dropout=0.0, batch_norm=False, cross_layers=2, low_rank=low_rank,
        structure=structure, **tables(4),
    ).eval()  # fmt: skip
    with torch.no_grad():  # non-zero biases, so that b_l is checked too
        for bias in model.cross.bias:
            bias.normal_()
    dense, kjt = tiny_batch()
    x0 = torch.stack(
        [torch.cat([*vecs, d]) for vecs, d in zip(vectors_by_hand(model, kjt), dense, strict=True)]
    )
    crossed = torch.stack([cross_by_hand(model.cross, row) for row in x0.detach()])
    if structure == "stacked":
        expected = model.dnn(crossed).squeeze(-1)
    else:  # one linear over [cross output, the DNN's last hidden layer]
        joined = torch.cat([crossed, model.dnn[:-1](x0)], dim=1)
        weight = torch.cat([model.cross_out.weight, model.dnn[-1].weight], dim=1)
        expected = (joined @ weight.T).squeeze(-1) + model.dnn[-1].bias
    torch.testing.assert_close(model(dense, kjt), expected)
    n = 3 * 4 + 2
    shapes = [tuple(p.shape) for p in model.cross.parameters()]
    assert shapes == ([(n, n)] * 2 + [(n, 1)] * 2 if low_rank is None else
                      [(n, 3)] * 2 + [(3, n)] * 2 + [(n,)] * 2)  # fmt: skip


def test_dlrm_matches_a_loop_reference():
    torch.manual_seed(0)
    model = DLRM(bottom_hidden=[8], top_hidden=[8], **tables(4))
    dense, kjt = tiny_batch()
    bottom = model.bottom(dense)
    assert bottom.shape == (3, 4) and (bottom >= 0).all()  # to embedding_dim, through a ReLU
    rows = []
    for d, vecs in zip(bottom, vectors_by_hand(model, kjt), strict=True):
        every = [d, *vecs]  # the dense vector first, as in TorchRec
        pairs = [every[i] @ every[j] for i, j in itertools.combinations(range(len(every)), 2)]
        rows.append(torch.cat([d, torch.stack(pairs)]))
    expected = model.top(torch.stack(rows)).squeeze(-1)
    torch.testing.assert_close(model(dense, kjt), expected)


def folded_state(model, dim: int) -> dict:
    """The model's state with each first-order weight in its vector's row: [vector | w | pad]."""
    state = {k: v for k, v in model.state_dict().items() if ".t_" not in k and ".w_" not in k}
    for name, rows in SPEC.categorical:
        row = torch.zeros(rows, table_width(dim + 1))
        if dim:
            row[:, :dim] = table(model, name)[:, :dim]
        row[:, dim] = table(model, name, "w")[:, 0]
        state[f"ebc.embedding_bags.t_{name}.weight"] = row
    return state


@pytest.mark.parametrize("dim", [0, 4, 6])
def test_a_state_dict_of_folded_first_order_weights_loads_into_their_own_tables(dim):
    torch.manual_seed(0)
    build = LR if dim == 0 else FM
    model = build(**tables(dim))
    dense, kjt = tiny_batch()
    expected = model(dense, kjt)
    fresh = build(**tables(dim))
    fresh.load_state_dict(unfold_first_order(fresh, folded_state(model, dim)))
    torch.testing.assert_close(fresh(dense, kjt), expected)


@pytest.mark.parametrize("dim", [3, 4])
def test_first_order_weights_in_the_vectors_rows_make_the_same_model(dim):
    torch.manual_seed(0)
    model = DeepFM(hidden=[8], dropout=0.0, batch_norm=False, **tables(dim))
    in_row = DeepFM(
        hidden=[8], dropout=0.0, batch_norm=False, **tables(dim), first_order_in_row=True
    )
    assert sorted(in_row.ebc.embedding_bags) == ["t_a", "t_b", "t_tags"]
    in_row.load_state_dict(folded_state(model, dim))
    dense, kjt = tiny_batch()
    torch.testing.assert_close(in_row(dense, kjt), model(dense, kjt))
    fresh = DeepFM(hidden=[8], dropout=0.0, batch_norm=False, **tables(dim))
    fresh.load_state_dict(unfold_first_order(fresh, in_row.state_dict()))
    torch.testing.assert_close(fresh(dense, kjt), model(dense, kjt))


def test_the_pairwise_term_and_its_gradient_are_the_sums_over_pairs():
    torch.manual_seed(0)
    fields = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    direct = sum((fields[:, i] * fields[:, j]).sum(1) for i, j in pairs)
    torch.testing.assert_close(fm_pairwise(fields), direct)
    assert torch.autograd.gradcheck(fm_pairwise, (fields,))  # the one-pass backward
    with torch.no_grad():  # the path torch.export traces
        torch.testing.assert_close(fm_pairwise(fields), direct)
