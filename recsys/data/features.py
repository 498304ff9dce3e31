"""The feature spec: which columns are label, dense floats and categorical ids."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from recsys.config import DataConfig, LabelKind


@dataclass(frozen=True)
class FeatureSpec:
    """Column roles and table sizes; saved with every exported model."""

    label: str
    label_kind: LabelKind
    dense: tuple[str, ...]
    categorical: tuple[tuple[str, int], ...]

    @classmethod
    def from_data_config(cls, data: DataConfig, vocab: dict | None = None) -> FeatureSpec:
        """Table sizes from config, or from the vocabularies when data.vocabulary is set."""
        tables = data.tables
        if vocab is not None:
            tables = {name: vocab[name].table_rows for name in tables}
        return cls(data.label, data.task, tuple(data.dense), tuple(tables.items()))

    @property
    def categorical_names(self) -> list[str]:
        return [name for name, _ in self.categorical]

    @property
    def columns(self) -> list[str]:
        return [self.label, *self.dense, *self.categorical_names]

    def only(self, columns: list[str]) -> FeatureSpec:
        """The same label with just these dense and categorical columns, in this spec's order."""
        dense = tuple(c for c in self.dense if c in columns)
        categorical = tuple((c, rows) for c, rows in self.categorical if c in columns)
        return FeatureSpec(self.label, self.label_kind, dense, categorical)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.label_kind.value  # the key model.pt files have
        d["categorical"] = dict(self.categorical)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(
            d["label"], LabelKind(d["task"]), tuple(d["dense"]), tuple(d["categorical"].items())
        )
