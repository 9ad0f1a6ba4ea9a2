"""What a chat request asks of its completion's structure: a response format, tools, tool choice, a reasoning budget.

Plain data (no torch): the router builds a `Constraint` from a request and sends it with the request; the replica
compiles it (`workers.engine.structured.StructuredDecoding`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILTIN_RECIPIENTS", "RESPONSE_FORMAT_TYPES", "TOOL_CHOICE_MODES", "Constraint", "ResponseFormat",
           "ToolSpec"]

RESPONSE_FORMAT_TYPES = ("json_schema", "json_object", "regex", "grammar")
TOOL_CHOICE_MODES = ("auto", "none", "required")
# harmony's built-in tool namespaces -> the recipients a call may name (what openai-harmony renders for them)
BUILTIN_RECIPIENTS: dict[str, tuple[str, ...]] = {
    "browser": ("browser.search", "browser.open", "browser.find"),
    "python": ("python",),
}


@dataclass(frozen=True)
class ResponseFormat:
    """The grammar of the final answer: `type` is one of RESPONSE_FORMAT_TYPES; `value` is the JSON Schema text,
    the regular expression or the EBNF grammar (empty for json_object)."""

    type: str
    value: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call: its harmony recipient ("functions.get_weather", "browser.search", "python") and,
    when strict, the JSON Schema text its arguments must follow (None: any JSON object; python: free code)."""

    recipient: str
    schema: str | None = None

    @property
    def is_code(self) -> bool:
        return self.recipient == "python"

    @property
    def channel(self) -> str:
        # functions go to commentary; harmony's built-in tools are called from the analysis channel
        return "commentary" if self.recipient.startswith("functions.") else "analysis"


@dataclass(frozen=True)
class Constraint:
    """What a request asks of its completion's structure (plain data: it travels from router to replica)."""

    response_format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # auto | none | required | a recipient from `tools`
    max_reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        rf = self.response_format
        if rf is not None and rf.type not in RESPONSE_FORMAT_TYPES:
            raise ValueError(f"response_format.type must be one of {list(RESPONSE_FORMAT_TYPES)}, got {rf.type!r}")
        recipients = [t.recipient for t in self.tools]
        if len(set(recipients)) != len(recipients):
            raise ValueError(f"tools: duplicate recipients in {recipients}")
        if self.tool_choice not in TOOL_CHOICE_MODES and self.tool_choice not in recipients:
            raise ValueError(f"tool_choice {self.tool_choice!r} names no declared tool (declared: {recipients})")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs at least one tool")
        budget = self.max_reasoning_tokens
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
            raise ValueError(f"max_reasoning_tokens must be an integer >= 0, got {budget!r}")

    @property
    def answer_allowed(self) -> bool:
        return self.tool_choice in ("auto", "none")

    def callable_tools(self) -> tuple[ToolSpec, ...]:
        if self.tool_choice == "none":
            return ()
        if self.tool_choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.recipient == self.tool_choice)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraint:
        rf = data.get("response_format")
        tools = tuple(ToolSpec(t["recipient"], t.get("schema")) for t in data.get("tools") or ())
        return cls(ResponseFormat(rf["type"], rf.get("value", "")) if rf else None, tools,
                   data.get("tool_choice") or "auto", data.get("max_reasoning_tokens"))

    def to_dict(self) -> dict[str, Any]:
        rf = self.response_format
        return {"response_format": {"type": rf.type, "value": rf.value} if rf else None,
                "tools": [{"recipient": t.recipient, "schema": t.schema} for t in self.tools],
                "tool_choice": self.tool_choice, "max_reasoning_tokens": self.max_reasoning_tokens}

    def key(self) -> str:
        """Hash of everything that shapes the compiled automaton (the budget is per request, not compiled)."""
        data = self.to_dict()
        data.pop("max_reasoning_tokens")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
