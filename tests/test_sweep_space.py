"""Search-space syntax -> Optuna distributions, override round trips, task return values."""

import math

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from digitnet.errors import DigitnetError
from digitnet.sweep.study import make_pruner, make_sampler
from hydra_plugins.digitnet_optuna_sweeper.search_space import parse_search_space
from hydra_plugins.digitnet_optuna_sweeper.sweeper import override_value
from hydra_plugins.digitnet_optuna_sweeper.trial_task import objective_values

PARSER = OverridesParser.create()


def space(params=None, arguments=()):
    return parse_search_space(params or {}, list(arguments), PARSER)


def test_each_syntax_maps_to_its_distribution():
    s = space(
        {
            "optim.lr": "tag(log, interval(1e-4, 1e-1))",
            "model.dropout": "interval(0, 0.5)",
            "model.hidden": "int(interval(16, 256))",
            "model.width": "tag(log, int(interval(8, 64)))",
            "trainer.max_epochs": "range(2, 11, 4)",
            "optim.momentum": "range(0.1, 0.5, 0.1)",
            "model.act": "choice(relu, gelu)",
        },
        ["model=cnn,convnext", "trainer.limit_train_batches=5"],
    )
    dists = {p.name: p.distribution for p in s.params}
    assert dists["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert dists["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert dists["model.hidden"] == IntDistribution(16, 256)
    assert dists["model.width"] == IntDistribution(8, 64, log=True)
    assert dists["trainer.max_epochs"] == IntDistribution(2, 10, step=4)
    assert dists["optim.momentum"] == FloatDistribution(0.1, 0.4, step=0.1)
    assert dists["model.act"] == CategoricalDistribution(["relu", "gelu"])
    assert dists["model"] == CategoricalDistribution(["cnn", "convnext"])
    assert s.fixed == ("trainer.limit_train_batches=5",)


def test_command_line_wins_over_config_params():
    s = space({"optim.lr": "interval(0.1, 0.2)"}, ["optim.lr=choice(0.5, 0.7)"])
    [param] = s.params
    assert param.distribution == CategoricalDistribution([0.5, 0.7])


def test_overrides_reproduce_the_sampled_values():
    s = space({"optim.lr": "tag(log, interval(1e-5, 1e-1))", "model.dims": "choice([8,16],[16,32])"})
    lr, dims = s.params
    assert lr.override(1.2345e-05) == "optim.lr=1.2345e-05"
    # list choices are sampled by their text and set back as lists
    assert dims.distribution.choices == ("[8,16]", "[16,32]")
    assert PARSER.parse_override(dims.override("[16,32]")).value() == [16, 32]
    assert PARSER.parse_override(lr.override(1.2345e-05)).value() == 1.2345e-05


def test_plus_prefixed_keys_keep_their_prefix_in_overrides_only():
    [param] = space(arguments=["+trainer.limit_train_batches=choice(5,10)"]).params
    assert param.name == "trainer.limit_train_batches"
    assert param.override(10) == "+trainer.limit_train_batches=10"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("interval(0.5, 0.1)", "is empty"),
        ("interval(1, 1)", "is empty"),
        ("tag(log, interval(0, 1))", "positive lower bound"),
        ("range(5, 1)", "contains no value"),
        ("tag(log, choice(1, 2))", "only works with interval"),
        ("interval(1,", "bad sweep parameter"),
    ],
)
def test_bad_specs_fail_with_a_clear_message(spec, message):
    with pytest.raises(DigitnetError, match=message):
        space({"optim.lr": spec})


def test_grid_values_and_their_absence_for_intervals():
    s = space({"a": "choice(x, y)", "b": "range(1, 7, 2)", "c": "range(0.1, 0.35, 0.1)"})
    assert s.grid() == {"a": ["x", "y"], "b": [1, 3, 5], "c": [0.1, 0.2, 0.3]}
    assert space({"a": "interval(0, 1)"}).grid() is None


def test_samples_cover_every_categorical_choice():
    s = space({"a": "choice(x, y, z)", "b": "interval(1, 2)"}, ["c=3"])
    assert s.samples() == [["c=3", "a=x", "b=1.0"], ["c=3", "a=y", "b=1.0"], ["c=3", "a=z", "b=1.0"]]


@pytest.mark.parametrize("text", ["sqlite:////tmp/a b/study.db", "postgresql://u:p'w\\d\\'@h:5/db\\", "a,b", "val/acc"])
def test_override_values_survive_hydras_parser(text):
    assert PARSER.parse_override(f"++k={override_value(text)}").value() == text


def test_mapping_override_values_survive_hydras_parser():
    spec = {"name": "median", "n_warmup_steps": 2, "flag": True, "none": None}
    assert PARSER.parse_override(f"++k={override_value(spec)}").value() == spec


def test_objective_values_accepts_numbers_and_rejects_the_rest():
    assert objective_values(0.5, 1) == [0.5]
    assert objective_values([0.9, 1000], 2) == [0.9, 1000.0]
    for returned, n, message in [
        (None, 1, "returned None"),
        ([0.9, 1.0], 1, "2 value"),
        (math.nan, 1, "must be finite"),
        ("high", 1, "not numbers"),
    ]:
        with pytest.raises(ValueError, match=message):
            objective_values(returned, n)


def test_sampler_and_pruner_factories():
    assert isinstance(make_sampler("tpe", 0), optuna.samplers.TPESampler)
    assert isinstance(make_sampler({"name": "random"}, 0), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("cmaes", 0), optuna.samplers.CmaEsSampler)
    assert isinstance(make_sampler("nsgaii", 0), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler("grid", 0, {"a": [1, 2]}), optuna.samplers.GridSampler)
    pruner = make_pruner({"name": "median", "n_warmup_steps": 3})
    assert isinstance(pruner, optuna.pruners.MedianPruner) and pruner._n_warmup_steps == 3
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    asha = make_pruner({"name": "successive_halving", "min_resource": 1, "reduction_factor": 2})
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner) and asha._reduction_factor == 2
    patient = make_pruner({"name": "patient", "patience": 1, "wrapped_pruner": {"name": "median"}})
    assert isinstance(patient, optuna.pruners.PatientPruner)
    assert isinstance(patient._wrapped_pruner, optuna.pruners.MedianPruner)
    with pytest.raises(DigitnetError, match="unknown sampler 'bayes'"):
        make_sampler("bayes", 0)
    with pytest.raises(DigitnetError, match="unknown pruner"):
        make_pruner("wilcoxon")
    with pytest.raises(DigitnetError, match="bad options for pruner 'patient'"):
        make_pruner({"name": "patient", "wrapped_pruner": "median"})  # no patience
    with pytest.raises(DigitnetError, match="bad options for pruner 'none'"):
        make_pruner({"name": "none", "n_warmup_steps": 1})
    with pytest.raises(DigitnetError, match="needs choice"):
        make_sampler("grid", 0, None)
