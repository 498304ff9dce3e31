"""Composition of every config group and the checks that stop bad config before training."""

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from recsys import config as schema
from recsys.data.features import FeatureSpec
from recsys.demo.ctr import DemoSpec
from recsys.errors import ConfigError
from tests.conftest import CONF, compose_cfg

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_model_data_trainer_composes_and_instantiates(model, data, trainer):
    required = {"s3_parquet": ["data.uri=s3://bucket/prefix/"]}.get(data, [])
    cfg = compose_cfg(f"model={model}", f"data={data}", f"trainer={trainer}", *required)
    typed = schema.to_object(cfg)
    spec = FeatureSpec.from_data_config(typed.data)
    build = instantiate(cfg.model, _partial_=True, _convert_="all")
    if model == "two_tower" and data != "interactions":  # its towers name the demo's columns
        with pytest.raises(ConfigError, match="model.user_features names"):
            build(features=spec, device="meta")
        return
    net = build(features=spec, device="meta")
    assert isinstance(net, torch.nn.Module)
    tables = net.ebc.embedding_bag_configs()
    for kind in {t.name.split("_", 1)[0] for t in tables}:  # vectors t_, first-order weights w_
        of_kind = [t.feature_names for t in tables if t.name.startswith(f"{kind}_")]
        assert of_kind == [[name] for name in spec.categorical_names]


def test_demo_data_config_matches_the_generator():
    typed = schema.to_object(compose_cfg())
    spec = DemoSpec()
    assert typed.data.dense == spec.dense_names
    assert typed.data.tables == spec.categorical


def test_defaults():
    cfg = compose_cfg()
    assert cfg.model._target_ == "recsys.models.DeepFM"
    assert cfg.data.path == schema.demo_dir()


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.dense_optimizer.lr=-0.1", "trainer.dense_optimizer.lr=-0.1 is out of range"),
        ("trainer.sparse_optimizer.lr=0", "trainer.sparse_optimizer.lr=0.0 is out of range"),
        ("model.embedding_dim=0", "model.embedding_dim=0 is out of range"),
        ("model.dropout=1.5", "model.dropout=1.5 is out of range"),
        ("model.hidden=[64,0]", r"model.hidden\[1\]=0 is out of range"),
        ("data.batch_size=0", "data.batch_size=0 is out of range"),
        ("data.s3.outage_budget_s=-1", "data.s3.outage_budget_s=-1.0 is out of range"),
        ("data.categorical=[c3:-5]", r"data.categorical\[0\] \(c3\)=-5 is out of range"),
        ("data.categorical=[c3]", r"data.categorical\[0\]='c3' is not 'column:rows'"),
        ("data.categorical=[]", "data.categorical is empty"),
        ("trainer.grad_accumulation=0", "trainer.grad_accumulation=0 is out of range"),
        ("trainer.lr_schedule.min_ratio=2", "trainer.lr_schedule.min_ratio=2.0 is out of range"),
        ("data.dense=[d0,c1]", r"column\(s\) \['c1'\] are configured twice"),
        ("data.dense=[d0,d0]", r"column\(s\) \['d0'\] are configured twice"),
        ("data.dense_max_abs=0", "data.dense_max_abs=0.0 is out of range"),
        ("data.max_list_length=0", "data.max_list_length=0 is out of range"),
        ("data.dense_fill_value=-1e7", r"data.dense_fill_value=-10000000.0 is beyond data.dense_m"),
    ],
)
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        schema.to_object(compose_cfg(override))


@pytest.mark.parametrize(
    "model,override,message",
    [
        ("dcn_v2", "model.cross_layers=0", "model.cross_layers=0 is out of range"),
        ("dcn_v2", "model.low_rank=0", "model.low_rank=0 is out of range"),
        ("dlrm", "model.top_hidden=[64,0]", r"model.top_hidden\[1\]=0 is out of range"),
    ],
)
def test_dcn_v2_and_dlrm_sizes_name_the_key(model, override, message):
    with pytest.raises(ConfigError, match=message):
        schema.to_object(compose_cfg(f"model={model}", override))


@pytest.mark.parametrize(
    "override,error",
    [
        ("trainer.max_epoch=3", ConfigKeyError),  # a typo
        ("trainer.max_epochs=abc", ValidationError),  # a wrong type
        ("data.task=ranking", ValidationError),  # not a label kind
        ("trainer.sparse_optimizer.type=lamb", ValidationError),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose_time(override, error):
    with pytest.raises((ConfigCompositionException, error)) as info:
        compose_cfg(override)
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+model.embeding_dim=8", r"model.embeding_dim is not a key .* mean model.embedding_dim\?"),
        ("+trainer.max_epoch=3", r"trainer.max_epoch is not a key .* mean trainer.max_epochs\?"),
        ("+data.sufle_buffer=8", r"data.sufle_buffer is not a key .* mean data.shuffle_buffer\?"),
        ("+xyz=1", r"xyz is not a key of the root config .* its keys: \['data'"),
    ],
)
def test_keys_added_with_plus_under_a_typed_node_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        schema.to_object(compose_cfg(override))


def test_plus_keys_the_built_class_takes_are_kept():
    typed = schema.to_object(compose_cfg("+trainer.dense_optimizer.betas=[0.9,0.99]"))
    assert typed.trainer.dense_optimizer.betas == [0.9, 0.99]  # an argument of torch.optim.Adam


def test_unknown_model_lists_the_choices():
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/transformer'"):
        compose_cfg("model=transformer")
