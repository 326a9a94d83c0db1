"""Reading a config file: UTF-8 YAML text, with a key given twice in one mapping refused (PyYAML keeps the last)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .constraints import ConfigError

__all__ = ["read_yaml"]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently).

    A repeated `lr:` under `train:` is an edit that did not take, or an old value left behind; either way the file
    does not say what the run will use. `construct_document` first notes every mapping's dotted path so that the
    error can name the key in full.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.paths: dict[int, str] = {}

    def construct_document(self, node: yaml.Node) -> Any:
        self._note_paths(node, "")
        return super().construct_document(node)

    def _note_paths(self, node: yaml.Node, path: str) -> None:
        if id(node) in self.paths:  # an alias met again (or a recursive one)
            return
        if isinstance(node, yaml.MappingNode):
            self.paths[id(node)] = path
            for k, v in node.value:
                key = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                self._note_paths(v, f"{path}.{key}" if path else key)
        elif isinstance(node, yaml.SequenceNode):
            self.paths[id(node)] = path
            for i, v in enumerate(node.value):
                self._note_paths(v, f"{path}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for k, _ in node.value:  # the keys as written, before `<<` merges (which a written key may override)
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(k)
            try:
                line = first.setdefault(key, k.start_mark.line + 1)
            except TypeError:  # an unhashable key; the safe constructor refuses it below
                continue
            if line != k.start_mark.line + 1:
                path = self.paths.get(id(node), "")
                raise ConfigError(
                    f"key {f'{path}.{key}' if path else key} given twice, at lines {line} and "
                    f"{k.start_mark.line + 1}; expected each key once (the second would replace the first)"
                )
        return super().construct_mapping(node, deep)


def read_yaml(p: Path) -> Any:
    """The YAML document in `p`, or a one-line ConfigError naming the file and, for a syntax error, the line."""
    try:
        text = p.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not content
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p}: not a UTF-8 YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8); "
            "expected a YAML config"
        ) from None
    loader = None
    try:
        loader = _StrictLoader(text)  # checks that every character is printable
        return loader.get_single_data()
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.reader.ReaderError as e:  # a control character: binary data that happens to be valid UTF-8
        raise ConfigError(
            f"{p}: not a YAML text file (control character #x{e.character:04x} at offset {e.position}); "
            "expected a YAML config"
        ) from None
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else "?"
        context = ""
        if e.context:
            cm = e.context_mark
            context = f" ({e.context}" + (f" from line {cm.line + 1}, column {cm.column + 1})" if cm else ")")
        raise ConfigError(f"{p}: not valid YAML at {where}: {e.problem}{context}") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of more than 4300 digits (Python's limit)
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
