"""The tables' Adam on CPU against torch's SparseAdam over plain EmbeddingBags."""

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from recsys.config import ShardingConfig, SparseOptimizer, SparseOptimizerConfig
from recsys.distributed import init_process_group, row_sparse_adam, shard
from recsys.sparse_adam import RowSparseAdam, Rule, TableGroup, table_kernels

TABLES = [("t_a", 8, 50, "a"), ("w_a", 4, 50, "a"), ("t_b", 8, 30, "b")]  # mixed widths, shared


class Tables(torch.nn.Module):
    def __init__(self, tables=TABLES):
        super().__init__()
        configs = [EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=[f])
                   for n, d, r, f in tables]  # fmt: skip
        self.ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))

    def forward(self, kjt):
        return self.ebc(kjt).values()


def local(tensor):
    return tensor.local_shards()[0].tensor if hasattr(tensor, "local_shards") else tensor


def test_row_sparse_adam_matches_torch_sparse_adam_over_touched_rows():
    init_process_group(torch.device("cpu"))
    torch.manual_seed(0)
    cfg = SparseOptimizerConfig(type=SparseOptimizer.adam, lr=0.01)
    model = shard(Tables(), torch.device("cpu"), cfg, ShardingConfig())
    adam = row_sparse_adam(model, torch.device("cpu"), cfg)
    state = model.state_dict()
    ref = {}
    for name, dim, rows, _ in TABLES:
        ref[name] = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
        ref[name].weight.data.copy_(local(next(v for k, v in state.items() if name in k)))
    opt = torch.optim.SparseAdam([e.weight for e in ref.values()], lr=0.01)
    target = torch.randn(8, 20)
    lengths = {
        "a": torch.tensor([2, 1, 1, 2, 1, 1, 2, 2]),
        "b": torch.tensor([1, 1, 2, 1, 0, 1, 2, 1]),
    }
    for _ in range(20):  # ids of a in 0..39 only: rows 40..49 must stay as they were
        ids = {"a": torch.randint(0, 40, (12,)), "b": torch.randint(0, 30, (9,))}
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.cat([ids["a"], ids["b"]]),
            lengths=torch.cat([lengths["a"], lengths["b"]]),
        )  # fmt: skip
        ((model(kjt) - target) ** 2).sum().backward()
        adam.step()
        offsets = {f: torch.cumsum(n, 0) - n for f, n in lengths.items()}
        out = torch.cat([ref[n](ids[f], offsets[f]) for n, _, _, f in TABLES], 1)
        opt.zero_grad()
        ((out - target) ** 2).sum().backward()
        opt.step()
    state = model.state_dict()
    for name, e in ref.items():
        trained = local(next(v for k, v in state.items() if name in k))
        torch.testing.assert_close(trained, e.weight.data, atol=2e-5, rtol=0)


def test_a_first_order_column_in_the_row_gets_its_own_rule_and_state():
    """Rows [vector (6) | first-order weight | padding]: Adam on the vector, Adagrad on column 6,
    as torch's SparseAdam and Adagrad over separate bags; the padding never changes."""
    init_process_group(torch.device("cpu"))
    torch.manual_seed(0)
    cfg = SparseOptimizerConfig(type=SparseOptimizer.adam, lr=0.01)
    model = shard(Tables([("t_a", 8, 40, "a")]), torch.device("cpu"), cfg, ShardingConfig())
    group = TableGroup(
        "t_", Rule(SparseOptimizer.adam, 0.01), Rule(SparseOptimizer.adagrad, 0.1), 6
    )
    opt = RowSparseAdam(table_kernels(model), [group])
    start = local(next(iter(model.state_dict().values()))).clone()
    vec = torch.nn.EmbeddingBag(40, 6, mode="sum", sparse=True, _weight=start[:, :6].clone())
    bias = torch.nn.EmbeddingBag(40, 1, mode="sum", sparse=True, _weight=start[:, 6:7].clone())
    refs = [
        torch.optim.SparseAdam([vec.weight], lr=0.01),
        torch.optim.Adagrad([bias.weight], lr=0.1),
    ]
    target, lengths = torch.randn(6, 7), torch.tensor([2, 1, 1, 2, 1, 2])
    for _ in range(15):
        ids = torch.randint(0, 30, (9,))
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=ids, lengths=lengths)
        ((model(kjt)[:, :7] - target) ** 2).sum().backward()
        opt.step()
        offsets = torch.cumsum(lengths, 0) - lengths
        out = torch.cat([vec(ids, offsets), bias(ids, offsets)], 1)
        for ref in refs:
            ref.zero_grad()
        ((out - target) ** 2).sum().backward()
        for ref in refs:
            ref.step()
    trained = local(next(iter(model.state_dict().values())))
    torch.testing.assert_close(trained[:, :6], vec.weight.data, atol=2e-5, rtol=0)
    torch.testing.assert_close(trained[:, 6:7], bias.weight.data, atol=2e-5, rtol=0)
    assert torch.equal(trained[:, 7], start[:, 7])


def test_options_the_optimizer_lacks_are_refused():
    import pytest

    from recsys.errors import ConfigError

    key = "trainer.first_order_optimizer"
    with pytest.raises(ConfigError, match=f"{key}.eps is set but sgd has no eps"):
        SparseOptimizerConfig(type=SparseOptimizer.sgd, eps=1e-6).check(key)
    with pytest.raises(ConfigError, match="adagrad has no betas"):
        SparseOptimizerConfig(type=SparseOptimizer.adagrad, betas=[0.9, 0.99]).check(key)
    with pytest.raises(ConfigError, match=r"betas=\[0.9, 1.0\] is out of range"):
        SparseOptimizerConfig(type=SparseOptimizer.adam, betas=[0.9, 1.0]).check(key)
