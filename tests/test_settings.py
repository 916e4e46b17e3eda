"""The one validation layer: each rule is written once (in `memagent_jax.settings`, used by the settings
dataclasses), and every surface that takes the setting (the sampler, the settings file, train's and evaluate's
configs, answer's flags) refuses the same bad values with an error naming its own path."""

import json
import math

import pytest

from hf_tiny import grpo_cpu_config
from memagent_jax import settings
from memagent_jax.agent import AgentBudgets, AgentSettings, AgentSettingsError
from memagent_jax.configs import evaluate as evaluate_config
from memagent_jax.sampling import SamplingError, SamplingParams

BAD_TEMPERATURES = [float("nan"), float("inf"), -0.5, True, "hot"]


def _train_check(temperature):
    from memagent_jax.rl.recipe import validate_config

    cfg = grpo_cpu_config("/unused", **{"agent.temperature": temperature})
    validate_config(cfg, device_count=1, check_files=False)


def _evaluate_check(temperature):
    from memagent_jax import evaluate

    cfg = evaluate_config.get_config("cpu")
    cfg.agent.temperature = 1.0  # a placeholder takes its type from the first value; then the bad one
    cfg.agent.temperature = temperature
    evaluate.agent_overrides(cfg)


def _settings_file_check(temperature, tmp_path):
    (tmp_path / "memagent_agent.json").write_text(json.dumps({"agent": {"temperature": temperature}}))
    AgentSettings.load(tmp_path)


SURFACES = [
    ("sampler", SamplingError, r"^temperature must be", BAD_TEMPERATURES),
    ("settings file", AgentSettingsError, r"memagent_agent\.json: field agent\.temperature must be", BAD_TEMPERATURES),
    # A ConfigDict field typed float refuses booleans and strings by itself, before the rule runs.
    ("evaluate config", ValueError, r"^config\.agent\.temperature must be", BAD_TEMPERATURES[:3]),
]


@pytest.mark.parametrize(
    "surface, error, where, value",
    [
        pytest.param(name, error, where, value, id=f"{name}-{value!r}")
        for name, error, where, values in SURFACES
        for value in values
    ],
)
def test_one_temperature_rule_on_every_surface(surface, error, where, value, tmp_path):
    with pytest.raises(error, match=where + r" a finite number >= 0 \(0 = greedy\), got "):
        if surface == "sampler":
            SamplingParams(temperature=value)
        elif surface == "settings file":
            _settings_file_check(value, tmp_path)
        else:
            _evaluate_check(value)


@pytest.mark.parametrize("value", [float("nan"), -0.5], ids=repr)
def test_train_config_refuses_bad_temperatures_naming_the_path(value):
    from memagent_jax.rl.recipe import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"^config\.agent\.temperature must be a finite number >= 0"):
        _train_check(value)


def test_train_keeps_its_own_rule_on_top_greedy_rollouts_compare_nothing():
    from memagent_jax.rl.recipe import TrainConfigError

    with pytest.raises(TrainConfigError, match=r"config\.agent\.temperature must be > 0 \(GRPO"):
        _train_check(0.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("chunk_tokens", True, "must be an integer > 0, got True"),
        ("chunk_tokens", 2.5, "must be an integer > 0, got 2.5"),
        ("max_document_tokens", -1, "must be an integer >= 0 (0 = whole documents), got -1"),
        ("question_overflow", "drop", "must be one of ['error', 'truncate'], got 'drop'"),
    ],
)
def test_budgets_check_themselves_and_build_names_the_config_path(field, value, message):
    with pytest.raises(settings.SettingError) as direct:
        AgentBudgets(**{field: value})
    assert str(direct.value) == f"{field} {message}" and direct.value.field == field
    with pytest.raises(settings.ConfigError) as built:
        settings.build(AgentBudgets, {field: value}, "config.agent")
    assert str(built.value) == f"config.agent.{field} {message}"


def test_named_renames_dataclass_fields_to_their_config_names():
    from memagent_jax.rl.learner import OptimizerConfig

    with pytest.raises(settings.ConfigError, match=r"^config\.steps .*required for the cosine schedule"):
        with settings.named("config", rename={"total_steps": "steps"}):
            OptimizerConfig(schedule="cosine", total_steps=None)


@pytest.mark.parametrize(
    "rule, kwargs, value, ok",
    [
        (settings.integer, dict(minimum=1), 3, 3),
        (settings.integer, dict(minimum=1), 0, None),
        (settings.integer, dict(minimum=0), False, None),
        (settings.real, dict(low=0, low_open=True), 1e-9, 1e-9),
        (settings.real, dict(low=0, low_open=True), 0.0, None),
        (settings.real, dict(low=0, high=1), math.nan, None),
        (settings.real, dict(none_ok=True), None, None),
        (settings.choice, dict(choices=("a", "b")), "b", "b"),
        (settings.choice, dict(choices=(0, 1)), True, None),
    ],
)
def test_rules_accept_and_refuse_by_hand(rule, kwargs, value, ok):
    if ok is None and not kwargs.get("none_ok"):
        with pytest.raises(settings.SettingError, match=r"^x must be"):
            rule("x", value, **kwargs)
    else:
        assert rule("x", value, **kwargs) == ok
