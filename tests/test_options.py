"""The one option table: its kinds, and that the engine, the methods and the job share it."""
import inspect
import math

import pytest

from l2t_fast.jobs import options
from l2t_fast.jobs.options import Choice, Flag, Float, Int, ListOf, Pair, Text
from l2t_fast.methods import registry
from l2t_fast.methods.l2tww.engine import L2TWW


def test_engine_defaults_are_the_tables():
    table = options.table()
    signature = inspect.signature(L2TWW).parameters
    shared = [name for name, p in signature.items()
              if name in table and p.default is not inspect.Parameter.empty]
    assert {"beta", "lr", "momentum", "weight_decay", "meta_lr", "meta_weight_decay",
            "inner_steps", "meta_period", "where_activation", "where_init",
            "pairs", "backend"} <= set(shared)
    for name in shared:
        assert signature[name].default == table[name].default, name


def test_every_method_option_is_in_the_table_once():
    table = options.table()
    for name, spec in registry().items():
        for option in spec.options:
            assert name in table[option.name].used_by
    assert len(table) == len({option.flag for option in table.values()})


@pytest.mark.parametrize("kind, value, expected", [
    (Int(1), "3", 3), (Int(1), 3.0, 3), (Float(0, above=True), "1e-4", 1e-4),
    (Float(), 2, 2.0), (Flag(), "off", False), (Text(optional=True), "none", None),
    (ListOf(Int(0)), "0", [0]), (ListOf(Int(0)), [1, 2], [1, 2]),
    (ListOf(Pair(), everything="all"), ["all"], "all"),
    (ListOf(Pair(), everything="all"), ["0:1", [2, 2]], [[0, 1], [2, 2]]),
    (Choice("a", "b"), "b", "b"),
])
def test_kinds_read_words_and_values(kind, value, expected):
    assert kind.coerce(value) == expected


@pytest.mark.parametrize("kind, value", [
    (Int(1), 0), (Int(), True), (Int(), 1.5), (Float(), math.inf), (Float(), math.nan),
    (Float(), "nan"), (Float(0, above=True), 0.0), (Float(0, 1, below=True), 1.0),
    (Float(), True), (Flag(), "maybe"), (Text(), None), (ListOf(Int()), []),
    (ListOf(Int()), [1, 1]), (Pair(), "0-1"), (Pair(), [1]), (Choice("a"), "c"),
])
def test_kinds_refuse_bad_values(kind, value):
    with pytest.raises(ValueError):
        kind.coerce(value)


def test_errors_name_the_option_and_what_it_takes():
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got inf"):
        options.coerce("lr", float("inf"))
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        options.coerce("colour", 1)
