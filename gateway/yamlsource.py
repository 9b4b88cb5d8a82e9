"""YAML loading that remembers where each value came from.

Configuration and policy errors must name the file, line and key of the mistake.
PyYAML's composer keeps a start mark on every node; :func:`load` returns the
plain data plus a :class:`Locator` that maps a key path back to its position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Locator:
    file: str
    root: yaml.Node | None

    def find(self, path: Sequence[str | int]) -> tuple[int | None, int | None]:
        """1-based (line, column) of the deepest node on ``path`` that exists."""
        node = self.root
        best = node
        for part in path:
            if isinstance(node, yaml.MappingNode):
                nxt = None
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                        best, nxt = k, v
                        break
                node = nxt
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                node = node.value[part] if 0 <= part < len(node.value) else None
                best = node or best
            else:
                node = None
            if node is None:
                break
            best = node if not isinstance(node, yaml.MappingNode | yaml.SequenceNode) else best
        if best is None:
            return None, None
        return best.start_mark.line + 1, best.start_mark.column + 1

    def error(self, path: Sequence[str | int], message: str) -> ConfigError:
        line, col = self.find(path)
        key = ".".join(str(p) for p in path) or None
        return ConfigError(message, file=self.file, line=line, column=col, key=key)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a silent override hides mistakes)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r}", line=key_node.start_mark.line + 1,
                column=key_node.start_mark.column + 1, key=str(key),
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def loads(text: str, file: str = "<string>") -> tuple[Any, Locator]:
    try:
        root = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        exc.file = file
        raise ConfigError(exc.message, file=file, line=exc.line, column=exc.column,
                          key=exc.key) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            f"invalid YAML: {exc.problem}", file=file,
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    return data, Locator(file, root)


def load(path: Path) -> tuple[Any, Locator]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read file: {exc}", file=str(path)) from None
    return loads(text, str(path))
