"""Agent settings that travel with an exported model: `memagent_agent.json` beside the Hugging Face files.

An exported model is only half of a memory agent: the same weights answer well with the wording, budgets and
sampling they were trained with, and badly with others. `train` (and the main job's warm-start export, through
`write_agent_settings`) therefore writes one small JSON file next to `config.json`:

    {
      "format": "memagent-agent", "version": 1,
      "agent": {"question_tokens": 16, "chunk_tokens": 32, "memory_tokens": 8, "answer_tokens": 12,
                "chunks_per_segment": 2, "max_document_tokens": 0, "question_overflow": "error",
                "temperature": 0.7, "top_p": 0.95, "top_k": null},
      "templates": {"memory_update": "...", "final_answer": "...", "initial_memory": "...", "system": null,
                    "prompt_mode": "pieces", "chat_template_kwargs": {}},
      "reward_style": "boxed_em", "extract": "boxed",
      "training": {"temperature": 1.0, "top_p": 1.0, "steps": 60, "source": "memagent_jax.train"}
    }

The names under "agent" are the config names (`--config.agent.chunk_tokens` in train and evaluate,
`--agent.chunk_tokens` in answer, `chunk_tokens=` in `MemoryAgent.from_pretrained`). `answer`, `evaluate`,
`generate` and `MemoryAgent.from_pretrained` read the file by default; anything given explicitly wins. A plain
Hugging Face folder without the file gets the documented defaults (`DEFAULTS`: the reference budgets
1024 / 5000 / 1024 / 1024, our default templates, and each tool's own sampling default). "training" is a record
only (the rollout's sampling and where the file came from); nothing reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from memagent_jax import settings as settings_lib
from memagent_jax.agent.chunking import AgentBudgets
from memagent_jax.agent.templates import AgentTemplates, TemplateError

SETTINGS_FILE = "memagent_agent.json"
FORMAT = "memagent-agent"
VERSION = 1

BUDGET_FIELDS = (
    "question_tokens",
    "chunk_tokens",
    "memory_tokens",
    "answer_tokens",
    "chunks_per_segment",
    "max_document_tokens",
    "question_overflow",
)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
TEMPLATE_FIELDS = tuple(f.name for f in dataclasses.fields(AgentTemplates))

# What a folder without memagent_agent.json gets (sampling: None = the tool's own default; answer, generate and
# from_pretrained decode greedily, evaluate samples at the paper's 0.7 / 0.95).
DEFAULTS = {name: getattr(AgentBudgets(), name) for name in BUDGET_FIELDS}


class AgentSettingsError(settings_lib.ConfigError):
    """memagent_agent.json is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """The settings a model was trained with (or the defaults).

    budgets / templates: `AgentBudgets` / `AgentTemplates`. temperature / top_p / top_k: the sampling to use by
    default (None: the tool's own default; top_k an integer >= 0, 0 = no top-k filter). reward_style / extract:
    the verifier rules the model was trained / is scored with. training: a free-form record (never read back).
    path: the file they came from ('' = defaults).
    """

    budgets: AgentBudgets = AgentBudgets()
    templates: AgentTemplates = AgentTemplates()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    reward_style: str = "boxed_em"
    extract: str = "boxed"
    training: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str = ""

    def __post_init__(self):
        if not isinstance(self.budgets, AgentBudgets):
            raise settings_lib.SettingError.at("budgets", f"must be an AgentBudgets, got {self.budgets!r}")
        if not isinstance(self.templates, AgentTemplates):
            raise settings_lib.SettingError.at("templates", f"must be an AgentTemplates, got {self.templates!r}")
        if self.temperature is not None:
            object.__setattr__(self, "temperature", settings_lib.temperature(self.temperature))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", settings_lib.top_p(self.top_p))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", settings_lib.top_k(self.top_k))
        for name in ("reward_style", "extract"):
            if not isinstance(getattr(self, name), str):
                raise settings_lib.SettingError.at(name, f"must be a string, got {getattr(self, name)!r}")

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict:
        agent = {name: getattr(self.budgets, name) for name in BUDGET_FIELDS}
        agent.update({name: getattr(self, name) for name in SAMPLING_FIELDS})
        templates = dataclasses.asdict(self.templates)
        templates["chat_template_kwargs"] = dict(self.templates.chat_template_kwargs)
        return {
            "format": FORMAT,
            "version": VERSION,
            "agent": agent,
            "templates": templates,
            "reward_style": self.reward_style,
            "extract": self.extract,
            "training": dict(self.training),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = SETTINGS_FILE) -> AgentSettings:
        """Parses the file's object; AgentSettingsError names `source` and the field at fault."""
        if not isinstance(data, dict):
            raise AgentSettingsError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT) != FORMAT:
            raise AgentSettingsError(f"{source}: field 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        version = data.get("version", VERSION)
        if version != VERSION:
            raise AgentSettingsError(
                f"{source}: field 'version' is {version!r}; this memagent-jax reads version {VERSION}"
            )
        known = {"format", "version", "agent", "templates", "reward_style", "extract", "training"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AgentSettingsError(f"{source}: unknown field(s) {unknown}; known: {sorted(known)}")
        agent = data.get("agent", {})
        if not isinstance(agent, dict):
            raise AgentSettingsError(f"{source}: field 'agent' must be an object")
        unknown = sorted(set(agent) - set(BUDGET_FIELDS) - set(SAMPLING_FIELDS))
        if unknown:
            raise AgentSettingsError(
                f"{source}: unknown field(s) agent.{unknown}; known: {list(BUDGET_FIELDS + SAMPLING_FIELDS)}"
            )
        with settings_lib.named(f"{source}: field agent", error=AgentSettingsError):
            budgets = AgentBudgets(**{k: v for k, v in agent.items() if k in BUDGET_FIELDS})
            sampling = {
                name: None if agent.get(name) is None else getattr(settings_lib, name)(agent[name])
                for name in SAMPLING_FIELDS
            }
        templates = data.get("templates", {})
        if not isinstance(templates, dict):
            raise AgentSettingsError(f"{source}: field 'templates' must be an object")
        unknown = sorted(set(templates) - set(TEMPLATE_FIELDS))
        if unknown:
            raise AgentSettingsError(f"{source}: unknown field(s) templates.{unknown}; known: {list(TEMPLATE_FIELDS)}")
        for name, value in templates.items():
            ok = (
                isinstance(value, dict)
                if name == "chat_template_kwargs"
                else isinstance(value, str) or (name == "system" and value is None)
            )
            if not ok:
                raise AgentSettingsError(f"{source}: field templates.{name} has the wrong type ({value!r})")
        try:
            parsed = AgentTemplates(**templates)
        except TemplateError as e:
            raise AgentSettingsError(f"{source}: field templates: {e}") from None
        for name in ("reward_style", "extract"):
            if name in data and not isinstance(data[name], str):
                raise AgentSettingsError(f"{source}: field {name!r} must be a string, got {data[name]!r}")
        training = data.get("training", {})
        if not isinstance(training, dict):
            raise AgentSettingsError(f"{source}: field 'training' must be an object")
        return cls(
            budgets=budgets,
            templates=parsed,
            **sampling,
            reward_style=data.get("reward_style", "boxed_em"),
            extract=data.get("extract", "boxed"),
            training=training,
            path=source,
        )

    # ---------------------------------------------------------------- files

    def save(self, folder: str | os.PathLike) -> str:
        """Writes `folder`/memagent_agent.json (temporary file + rename); returns its path."""
        path = os.path.join(os.fspath(folder), SETTINGS_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> AgentSettings:
        """The settings of a model folder: its memagent_agent.json, or `AgentSettings()` (the documented defaults)
        when the folder has none."""
        path = os.path.join(os.fspath(folder), SETTINGS_FILE)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AgentSettingsError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    # ---------------------------------------------------------------- overrides

    def override(self, **changes) -> AgentSettings:
        """A copy with settings replaced by their config names: any budget field (`chunk_tokens=...`), any
        template field (`memory_update=...`, `prompt_mode=...`), `temperature`, `top_p`, `top_k`, `reward_style`,
        `extract`; also `budgets=AgentBudgets(...)`, `templates=AgentTemplates(...)` or a templates JSON file path.
        None values are ignored (= keep). Unknown names raise TypeError naming them."""
        changes = {k: v for k, v in changes.items() if v is not None}
        budgets, templates = self.budgets, self.templates
        if "budgets" in changes:
            budgets = changes.pop("budgets")
        if "templates" in changes:
            value = changes.pop("templates")
            templates = value if isinstance(value, AgentTemplates) else AgentTemplates.from_file(value)
        b = {k: changes.pop(k) for k in list(changes) if k in BUDGET_FIELDS}
        t = {k: changes.pop(k) for k in list(changes) if k in TEMPLATE_FIELDS}
        rest = {k: changes.pop(k) for k in list(changes) if k in SAMPLING_FIELDS + ("reward_style", "extract")}
        if changes:
            raise TypeError(
                f"unknown agent setting(s) {sorted(changes)}; known: budgets, templates, "
                f"{', '.join(BUDGET_FIELDS + TEMPLATE_FIELDS + SAMPLING_FIELDS)}, reward_style, extract"
            )
        if b:
            budgets = dataclasses.replace(budgets, **b)
        if t:
            templates = templates.replace(**t)
        return dataclasses.replace(self, budgets=budgets, templates=templates, **rest)

    def sampling(self, default_temperature: float = 0.0, default_top_p: float = 1.0, default_top_k: int = 0):
        """`SamplingParams` of these settings (the defaults where they leave it open)."""
        from memagent_jax.sampling import SamplingParams

        return SamplingParams(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=default_top_p if self.top_p is None else self.top_p,
            top_k=default_top_k if self.top_k is None else self.top_k,
        )


def write_agent_settings(
    folder: str | os.PathLike,
    *,
    budgets: AgentBudgets,
    templates: AgentTemplates,
    temperature: float | None = 0.7,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    reward_style: str = "boxed_em",
    extract: str = "boxed",
    training: Mapping[str, Any] | None = None,
) -> str:
    """Writes `folder`/memagent_agent.json for an exported model (e.g. the main job's warm-start export, after
    `save_hf_checkpoint`); returns its path. temperature / top_p / top_k: the sampling `answer` / `evaluate` /
    `from_pretrained` use by default (default: the paper's evaluation sampling 0.7 / 0.95, no top-k filter)."""
    settings = AgentSettings(
        budgets=budgets,
        templates=templates,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        reward_style=reward_style,
        extract=extract,
        training=dict(training or {}),
    )
    return settings.save(folder)
