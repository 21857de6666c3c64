"""One declaration per config key: :class:`Key` (type, default, allowed values, one-line doc) and its checks.

:mod:`artifex_dpo.config` lists the service's keys as ``Key`` entries; the ``dpo.*`` keys are the fields of
:class:`artifex_dpo.dpo_config.DPOConfig`, declared there with :func:`field` and read back with
:func:`dataclass_keys`. The generic checks (type, choices, bounds) and the README table are derived from
these declarations. This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from typing import Any

_NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"
_COMPARISON = re.compile(rf"(>=|>|<=|<) ({_NUMBER})")
_INTERVAL = re.compile(rf"([\[(])({_NUMBER}), ({_NUMBER})([\])])")
_TYPE_NAMES = {bool: "True or False", int: "an int", float: "a number", str: "a string"}


def _within(bounds: str, value: Any) -> bool:
  """Whether ``value`` satisfies ``bounds`` ("> 0", ">= 1", "[0, 0.5)", "-1 or >= 1")."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    return False
  for alternative in bounds.split(" or "):
    if m := _COMPARISON.fullmatch(alternative):
      limit = float(m.group(2))
      holds = {">=": x >= limit, ">": x > limit, "<=": x <= limit, "<": x < limit}[m.group(1)]
    elif m := _INTERVAL.fullmatch(alternative):
      low, high = float(m.group(2)), float(m.group(3))
      holds = (x >= low if m.group(1) == "[" else x > low) and (x <= high if m.group(4) == "]" else x < high)
    elif re.fullmatch(_NUMBER, alternative):
      holds = x == float(alternative)
    else:
      raise ValueError(f"bounds {bounds!r}: cannot read {alternative!r}")
    if holds:
      return True
  return False


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  Attributes:
    name: dotted name, e.g. ``data.max_length``.
    default: the default value; None: unset (an ml_collections placeholder of ``value_type``).
    doc: one line saying what the key means (the allowed values are rendered from the fields below).
    value_type: bool, int, float or str; None: the type of ``default``.
    choices: the allowed values, or None (any value of the type).
    bounds: the allowed numbers: ``"> 0"``, ``">= 0"``, ``"[0, 1)"``, ``"-1 or >= 1"``; None: any.
    separator: the value is a list of ``choices`` joined by this (``"sigmoid,sft"``); empty: the default.
  """

  name: str
  default: Any
  doc: str
  value_type: type | None = None
  choices: tuple[str, ...] | None = None
  bounds: str | None = None
  separator: str | None = None

  def __post_init__(self):
    if self.value_type is None:
      if self.default is None:
        raise ValueError(f"Key {self.name}: an unset default needs value_type")
      object.__setattr__(self, "value_type", type(self.default))
    if self.value_type not in _TYPE_NAMES:
      raise ValueError(f"Key {self.name}: value_type {self.value_type} is not one of bool, int, float, str")
    if self.choices is not None:
      object.__setattr__(self, "choices", tuple(self.choices))
    if self.bounds is not None:
      _within(self.bounds, 0)  # raises on a typo in the bounds

  def problem(self, value: Any, *, check_type: bool = True) -> str | None:
    """What is wrong with ``value`` for this key ("must be > 0, got -1"), or None when it is allowed."""
    if value is None and self.default is None:
      return None  # unset
    if check_type and not self._has_type(value):
      unset = " or unset" if self.default is None else ""
      return f"must be {_TYPE_NAMES[self.value_type]}{unset}, got {value!r}"
    if self.choices is not None:
      if self.separator is None:
        if value not in self.choices:
          return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
      else:
        if isinstance(value, str):
          items = value.split(self.separator)
        else:
          items = value if isinstance(value, Sequence) else [value]
        for item in items:
          item = item.strip() if isinstance(item, str) else item
          if item != "" and item not in self.choices:
            return f"lists {item!r}, which is not one of {', '.join(map(str, self.choices))}"
    if self.bounds is not None and not _within(self.bounds, value):
      return f"must be {'in ' if self.bounds[0] in '[(' else ''}{self.bounds}, got {value!r}"
    return None

  def _has_type(self, value: Any) -> bool:
    if self.value_type is bool:
      return isinstance(value, bool)
    if isinstance(value, bool):
      return False
    if self.value_type is float:
      return isinstance(value, (int, float))
    return isinstance(value, self.value_type)

  def allowed(self) -> str:
    """The allowed values in words (for the README table): the choices, or the type and its bounds."""
    if self.choices is not None:
      names = " \\| ".join(f"`{c}`" for c in self.choices)
      text = f"list joined by `{self.separator}` of {names}" if self.separator else names
    else:
      text = self.value_type.__name__
      if self.bounds is not None:
        text += f" {'in ' if self.bounds[0] in '[(' else ''}{self.bounds}"
    return text + (" or unset" if self.default is None else "")


def field(default: Any, doc: str, **allowed: Any) -> Any:
  """A dataclass field that declares a config key: its default, one-line doc and ``Key`` options.

  Args:
    default: the field's default (the dataclass constructor is unchanged).
    doc: the one-line doc of the config key.
    **allowed: ``choices``, ``bounds`` or ``separator`` (see :class:`Key`).
  """
  return dataclasses.field(default=default, metadata={"doc": doc, **allowed})


def dataclass_keys(section: str, cls: type) -> list[Key]:
  """The keys ``section.<field>`` of a dataclass whose fields are declared with :func:`field`.

  An unset (None) default of a field that takes a string is the config default ``""`` (read back as None by
  :func:`dataclass_kwargs`); other unset defaults stay unset placeholders.
  """
  hints = typing.get_type_hints(cls)
  keys = []
  for f in dataclasses.fields(cls):
    types = typing.get_args(hints[f.name]) or (hints[f.name],)
    default, value_type = f.default, None
    if default is None:
      value_type = str if str in types else next(t for t in types if t in (bool, int, float))
      default = "" if value_type is str else None
    keys.append(Key(f"{section}.{f.name}", default, f.metadata["doc"], value_type=value_type,
                    choices=f.metadata.get("choices"), bounds=f.metadata.get("bounds"),
                    separator=f.metadata.get("separator")))
  return keys


def dataclass_kwargs(cls: type, values: typing.Mapping[str, Any]) -> dict[str, Any]:
  """The constructor arguments of ``cls`` from a config section (``""`` for an unset string field: None)."""
  return {f.name: None if f.default is None and values[f.name] == "" else values[f.name]
          for f in dataclasses.fields(cls)}


def check_fields(obj: Any) -> None:
  """Checks a dataclass's declared choices and bounds (not types); raises ValueError naming the field."""
  for f in dataclasses.fields(obj):
    if "doc" not in f.metadata:
      continue
    key = Key(f.name, f.default, f.metadata["doc"], value_type=str if f.default is None else None,
              choices=f.metadata.get("choices"), bounds=f.metadata.get("bounds"),
              separator=f.metadata.get("separator"))
    problem = key.problem(getattr(obj, f.name), check_type=False)
    if problem:
      raise ValueError(f"{type(obj).__name__}.{f.name} {problem}")


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown_table(keys: Sequence[Key]) -> str:
  """The README's table of config keys: key, default, allowed values, meaning (one row per key)."""
  rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
  for k in keys:
    rows.append(f"| `{k.name}` | `{_cell(repr(k.default))}` | {k.allowed()} | {_cell(k.doc)} |")
  return "\n".join(rows) + "\n"
