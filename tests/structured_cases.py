"""Shared cases for structured-output tests (engine, gRPC, HTTP): bounded JSON Schemas, regexes and EBNF grammars.

Every schema is bounded (strings have maxLength, arrays maxItems, numbers ranges), so a constrained completion ends
within a bounded number of tokens whatever the model's weights.
"""

from __future__ import annotations

import re
from typing import Any

_S = {"type": "string", "maxLength": 12}

SCHEMAS: list[dict[str, Any]] = [
    # 0 flat object
    {"type": "object", "properties": {"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    # 1 nested objects
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "email": _S}, "required": ["id", "email"],
                 "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    # 2 array of integers with min/maxItems
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 4},
    # 3 enum
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    # 4 number with a range
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"], "additionalProperties": False},
    # 5 string with a pattern
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    # 6 anyOf
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "string", "maxLength": 5}, {"type": "null"}]}},
     "required": ["value"], "additionalProperties": False},
    # 7 array of objects
    {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": _S, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}},
    # 8 boolean at the top
    {"type": "boolean"},
    # 9 enum of mixed types
    {"enum": ["yes", "no", 1, None]},
    # 10 const
    {"type": "object", "properties": {"kind": {"const": "event"}, "n": {"type": "integer", "minimum": 0,
                                                                        "maximum": 3}},
     "required": ["kind", "n"], "additionalProperties": False},
    # 11 deep nesting
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["c"], "additionalProperties": False}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    # 12 array of enums, unique items not required
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    # 13 string length bounds
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 6}},
     "required": ["word"], "additionalProperties": False},
    # 14 integer exclusive bounds
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"], "additionalProperties": False},
    # 15 nullable field via type list
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["note"], "additionalProperties": False},
    # 16 anyOf of objects
    {"anyOf": [{"type": "object", "properties": {"cat": _S}, "required": ["cat"], "additionalProperties": False},
               {"type": "object", "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 5}},
                "required": ["dog"], "additionalProperties": False}]},
    # 17 many required fields of every type
    {"type": "object", "properties": {"s": _S, "i": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "f": {"type": "number", "minimum": -1, "maximum": 1}, "b": {"type": "boolean"},
                                      "z": {"type": "null"}},
     "required": ["s", "i", "f", "b", "z"], "additionalProperties": False},
    # 18 array of arrays
    {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                                              "items": {"type": "boolean"}}},
    # 19 $defs and $ref
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "object", "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
     "required": ["from", "to"], "additionalProperties": False},
]

# (regex, a Python regex that every answer must fully match: the same language)
REGEXES: list[str] = [r"[a-z]{3}[0-9]{2}", r"(yes|no|maybe)", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"]

# (EBNF with rule `root`, a Python regex for the same language)
GRAMMARS: list[tuple[str, str]] = [
    ('root ::= "yes" | "no"', r"yes|no"),
    ('root ::= item ("," item){0,2}\nitem ::= [a-c]{1,3}', r"[a-c]{1,3}(,[a-c]{1,3}){0,2}"),
]

WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False},
}
TIME_TOOL: dict[str, Any] = {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
                   "required": ["tz"], "additionalProperties": False},
}


def full_match(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None
