"""``l2t-fast sweep --set KEY=VALUE`` reads one value of a list option as a list of one,
for every list option alike (issue 11: ``--set seeds=0`` was refused, ``methods=fm`` not)."""
from l2t_fast.jobs import sweep
from l2t_fast.jobs.transfer import resolve_config


def test_one_seed_is_read_like_one_method():
    grid = sweep.build_grid(set_options=["seeds=0", "methods=fm"])
    assert grid == {"seeds": [[0]], "methods": [["fm"]]}
    config = resolve_config(sweep.expand_grid(grid)[0])
    assert config["seeds"] == [0] and config["methods"] == ["fm"]


def test_several_single_seeds_are_several_trials():
    trials = sweep.expand_grid(sweep.build_grid(set_options=["seeds=0,3"]))
    assert [resolve_config(t)["seeds"] for t in trials] == [[0], [3]]
