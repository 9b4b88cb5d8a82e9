"""docs/configuration.md is generated from gateway/config.py and must stay in step with it."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import yaml

from gateway import config

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "scripts" / "gen-config-doc.py"
DOC = REPO / "docs" / "configuration.md"


def _generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_doc", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_config_doc", module)
    spec.loader.exec_module(module)
    return module


def _leaf_keys() -> list[tuple[str, str | None]]:
    """(dotted key, description) for every key that holds a value rather than a section."""
    return [(key, field.description) for key, field in _generator().iter_keys()]


def test_configuration_doc_matches_the_config_models() -> None:
    expected = _generator().render()
    current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert current == expected, (
        "docs/configuration.md is out of date with gateway/config.py: "
        "run `.venv/bin/python scripts/gen-config-doc.py` and commit the result"
    )


def test_every_configuration_key_has_a_description() -> None:
    undocumented = [key for key, desc in _leaf_keys() if not desc]
    assert undocumented == [], f"give these keys a Field(description=...): {undocumented}"


def test_every_configuration_key_appears_in_the_doc() -> None:
    text = _generator().render()
    missing = [key for key, _ in _leaf_keys() if f"| `{key}` |" not in text]
    assert missing == []


def test_generated_doc_shows_defaults_as_an_operator_writes_them() -> None:
    # Durations and sizes are rendered in the units the loader accepts, so the YAML block at
    # the end of the doc round-trips through the real parsers.
    gen = _generator()
    assert gen._human(432000.0, "duration") == "5d"
    assert gen._human(0.5, "duration") == "500ms"
    assert gen._human(36700160, "size") == "35M"
    assert config.parse_duration(gen._human(432000.0, "duration")) == 432000.0
    assert config.parse_size(gen._human(36700160, "size")) == 36700160


def test_yaml_defaults_block_loads_back_to_the_defaults() -> None:
    text = _generator().render()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert config.Config.model_validate(yaml.safe_load(block)) == config.Config()


def test_nested_sections_of_every_shape_are_documented() -> None:
    # A section may hold a model directly, a list of them, a name -> model mapping, or a
    # model or null; the keys inside each must reach the doc, not just the section's name.
    from pydantic import BaseModel, Field

    gen = _generator()

    class Inner(BaseModel):
        depth: int = Field(1, description="how deep")

    class Outer(BaseModel):
        one: Inner = Field(default_factory=Inner)
        many: list[Inner] = Field(default_factory=list)
        named: dict[str, Inner] = Field(default_factory=dict)
        maybe: Inner | None = Field(None)

    keys = [key for key, _ in gen.iter_keys(Outer)]
    assert keys == ["one.depth", "many[].depth", "named.<name>.depth", "maybe.depth"]
    assert gen.nested(dict[str, Inner]) == (Inner, "map")
    assert gen.nested(Inner | None) == (Inner, "optional")
    assert gen.nested(list[int]) is None
