"""Constrained decoding for harmony chat: structured outputs, tool choice and the reasoning budget.

A chat completion is a sequence of harmony messages: `<|channel|>analysis<|message|>...<|end|>`, then
`<|start|>assistant<|channel|>final<|message|>...<|return|>` or a tool call
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>`. A `Constraint` shapes that
sequence token by token:

- headers come from a token trie of the allowed alternatives (analysis while the reasoning budget lasts; the final
  answer unless a tool call is required; the tool calls `tool_choice` allows), so the model picks among them by its
  own logits and never writes a malformed header;
- the analysis body is free text (no special tokens) until `<|end|>`; at `max_reasoning_tokens` only `<|end|>` is
  allowed, then `<|start|>assistant` is forced;
- the final body follows the response format's grammar (xgrammar: JSON Schema, any JSON object, regex, EBNF) and
  may end only where the grammar accepts, with `<|return|>`; a strict tool's arguments follow its parameter schema
  and end with `<|call|>`; python code is free text.

xgrammar compiles grammars (cached by the constraint's hash) off the step loop, JSON Schema strings with a maxLength
as chains of rules (`chain_bounded_repeats`: same masks, precomputed instead of checked at run time); each step
`fill_bitmask` writes one bitmask row per constrained request and the sampler applies all rows in one vectorized call.

The spec itself (`Constraint`, `ResponseFormat`, `ToolSpec`, `BUILTIN_RECIPIENTS`) is plain data in
`workers.constraint`, which the router builds without torch; it is re-exported here.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gptoss_cluster.workers.constraint import BUILTIN_RECIPIENTS, Constraint, ResponseFormat, ToolSpec

__all__ = ["Constraint", "ConstraintState", "StructuredDecoding", "ResponseFormat", "ToolSpec",
           "BUILTIN_RECIPIENTS"]

# ================================================================================================ compiled form
_BODY_FREE, _BODY_GRAMMAR = 0, 1


@dataclass
class _Body:
    """What follows a header: free text or a grammar, ended by `terminator` (<|end|>, <|return|> or <|call|>)."""

    terminator: int
    grammar: Any = None  # xgrammar CompiledGrammar, or None for free text
    reasoning: bool = False  # counts against max_reasoning_tokens


@dataclass
class _TrieNode:
    children: dict[int, _TrieNode] = field(default_factory=dict)
    body: _Body | None = None  # set on the node reached by <|message|>
    allowed: np.ndarray | None = None  # the children's token ids (built once)


@dataclass
class CompiledConstraint:
    constraint: Constraint
    header_with_analysis: _TrieNode
    header_without_analysis: _TrieNode


class StructuredDecoding:
    """Per engine: the tokenizer's vocabulary for xgrammar, the grammar compiler and cache, the harmony token ids.

    Thread-safe: `compile` runs in the replica's worker threads while the step loop fills bitmasks."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        tid = tokenizer.token_id
        self.START, self.END, self.MESSAGE = tid("<|start|>"), tid("<|end|>"), tid("<|message|>")
        self.CHANNEL, self.CONSTRAIN = tid("<|channel|>"), tid("<|constrain|>")
        self.RETURN, self.CALL = tid("<|return|>"), tid("<|call|>")
        vocab = ordinary_token_bytes(tokenizer, vocab_size)
        # special and unused ids are empty strings: xgrammar never lets a grammar emit them (but stop tokens)
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[self.RETURN])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        # xgrammar's JSON strings admit raw control characters (a tab, say), which JSON forbids and json.loads
        # refuses; compact JSON needs no control character anywhere, so JSON grammars get a vocabulary without them
        json_vocab = [b"" if any(byte < 0x20 for byte in token) else token for token in vocab]
        json_info = xgr.TokenizerInfo(json_vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=[self.RETURN])
        self.json_compiler = xgr.GrammarCompiler(json_info, max_threads=1)
        self.words = xgr.get_bitmask_shape(1, vocab_size)[1]  # int32 words per bitmask row
        ordinary = np.fromiter((len(b) > 0 for b in vocab), dtype=bool, count=vocab_size)
        self._free_ordinary = ordinary  # ids free text may use (no special tokens)
        self._free_rows = {t: _bits(np.flatnonzero(ordinary).tolist() + [t], self.words)
                           for t in (self.END, self.RETURN, self.CALL)}
        self._assistant_ids = [self.START, *tokenizer.encode("assistant")]
        self._cache: dict[str, CompiledConstraint] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ compile
    def compile(self, constraint: Constraint | Mapping[str, Any]) -> CompiledConstraint:
        """The constraint's automaton (cached by its hash). Raises ValueError naming what is wrong or unsupported."""
        if not isinstance(constraint, Constraint):
            constraint = Constraint.from_dict(constraint)
        key = constraint.key()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit if hit.constraint == constraint else CompiledConstraint(
                constraint, hit.header_with_analysis, hit.header_without_analysis)
        answer = None
        if constraint.answer_allowed:
            answer = _Body(self.RETURN, self._grammar(constraint.response_format, "response_format"))
        calls = []
        for tool in constraint.callable_tools():
            grammar = None
            if not tool.is_code:
                what = f"tools[{tool.recipient}].parameters"
                grammar = self._grammar(ResponseFormat("json_schema", tool.schema) if tool.schema is not None
                                        else ResponseFormat("json_object"), what)
            calls.append((tool, _Body(self.CALL, grammar)))
        compiled = CompiledConstraint(constraint, self._header_trie(True, answer, calls),
                                      self._header_trie(False, answer, calls))
        with self._lock:
            if len(self._cache) > 1024:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compiled
        return compiled

    def _grammar(self, rf: ResponseFormat | None, where: str) -> Any:
        if rf is None:
            return None
        try:
            if rf.type == "json_schema":
                json.loads(rf.value)
                options = {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}
                ebnf = str(self._xgr.Grammar.from_json_schema(rf.value, **options))
                chained = chain_bounded_repeats(ebnf)
                if chained != ebnf:  # the same language, with masks xgrammar can precompute (see the helper)
                    try:
                        return self.json_compiler.compile_grammar(chained)
                    except (RuntimeError, ValueError, TypeError):
                        pass  # never expected; xgrammar's own compile below is always right, only slower
                return self.json_compiler.compile_json_schema(rf.value, **options)
            if rf.type == "json_object":
                return self.json_compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                              separators=(",", ":"), strict_mode=False)
            if rf.type == "regex":
                return self.compiler.compile_regex(rf.value)
            return self.compiler.compile_grammar(rf.value)
        except (RuntimeError, ValueError, TypeError) as exc:
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            # xgrammar prefixes a timestamp and its C++ source location: keep the reason only
            message = re.sub(r"^(\[[^\]]*\]\s*)?\S+\.(cc|h|cpp):\d+:\s*", "", message)
            raise ValueError(f"{where}: unsupported or invalid {rf.type}: {message}") from None

    def _header_trie(self, with_analysis: bool, answer: _Body | None,
                     calls: Sequence[tuple[ToolSpec, _Body]]) -> _TrieNode:
        enc = self.tokenizer.encode
        alternatives: list[tuple[list[int], _Body]] = []
        if with_analysis:
            alternatives.append(([self.CHANNEL, *enc("analysis"), self.MESSAGE], _Body(self.END, reasoning=True)))
        if answer is not None:
            alternatives.append(([self.CHANNEL, *enc("final"), self.MESSAGE], answer))
        for tool, body in calls:
            head = [self.CHANNEL, *enc(f"{tool.channel} to={tool.recipient}")]
            head += [*enc(" code"), self.MESSAGE] if tool.is_code else \
                [*enc(" "), self.CONSTRAIN, *enc("json"), self.MESSAGE]
            alternatives.append((head, body))
        root = _TrieNode()
        for ids, body in alternatives:
            node = root
            for token in ids:
                node = node.children.setdefault(token, _TrieNode())
            node.body = body
        _finish_trie(root)
        return root

    # ------------------------------------------------------------------------------------------------ per step
    def new_state(self, compiled: CompiledConstraint) -> ConstraintState:
        return ConstraintState(self, compiled)

    def fill_bitmask(self, states: Sequence[ConstraintState], bitmask: torch.Tensor, rows: Sequence[int]) -> None:
        """bitmask [R, words] int32: row rows[i] <- the tokens states[i] allows next."""
        view = bitmask.numpy()
        for state, row in zip(states, rows, strict=True):
            state.fill_row(bitmask, view, row)

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)


class ConstraintState:
    """One request's position in its constraint: in a header (trie node), in a body (free or a grammar matcher),
    following forced tokens, or done."""

    def __init__(self, decoding: StructuredDecoding, compiled: CompiledConstraint) -> None:
        self.d = decoding
        self.compiled = compiled
        budget = compiled.constraint.max_reasoning_tokens
        self.reasoning_left = budget  # None: unbounded
        self.reasoning_tokens = 0
        self.node: _TrieNode | None = self._header_root()
        self.body: _Body | None = None
        self.matcher: Any = None
        self.forced: list[int] = []
        self.done = False

    def _header_root(self) -> _TrieNode:
        c = self.compiled
        return c.header_without_analysis if self.reasoning_left == 0 else c.header_with_analysis

    # what may come next
    def fill_row(self, bitmask: torch.Tensor, view: np.ndarray, row: int) -> None:
        if self.done:
            view[row] = -1
        elif self.forced:
            view[row] = _bits([self.forced[0]], self.d.words)
        elif self.node is not None:
            view[row] = _bits(self.node.allowed, self.d.words)
        elif self.body is not None and self.matcher is not None:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        elif self.body is not None and self.body.reasoning and self.reasoning_left == 0:
            view[row] = _bits([self.d.END], self.d.words)
        else:
            assert self.body is not None
            view[row] = self.d._free_rows[self.body.terminator]

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the constraint did not allow it."""
        if self.done:
            return True
        if self.forced:
            if token != self.forced[0]:
                return False
            self.forced.pop(0)
            if not self.forced:
                self.node = self._header_root()
            return True
        if self.node is not None:
            child = self.node.children.get(token)
            if child is None:
                return False
            if child.body is None:
                self.node = child
                return True
            self.node, self.body = None, child.body
            if child.body.grammar is not None:
                self.matcher = self.d._xgr.GrammarMatcher(child.body.grammar,
                                                          override_stop_tokens=[child.body.terminator])
            return True
        body = self.body
        assert body is not None
        if self.matcher is not None:
            if not self.matcher.accept_token(token):
                return False
            if token == body.terminator:
                self._end_body()
            return True
        if token == body.terminator:
            self._end_body()
            return True
        if token >= len(self.d._free_ordinary) or not self.d._free_ordinary[token]:
            return False
        if body.reasoning:
            if self.reasoning_left == 0:
                return False
            self.reasoning_tokens += 1
            if self.reasoning_left is not None:
                self.reasoning_left -= 1
        return True

    def _end_body(self) -> None:
        body = self.body
        self.body, self.matcher = None, None
        if body is not None and body.terminator == self.d.END:
            self.forced = list(self.d._assistant_ids)  # the next message's <|start|>assistant
        else:
            self.done = True  # <|return|> or <|call|>: the completion is over


# ================================================================================================ helpers
def ordinary_token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Every id's bytes; special and unused ids map to b"" (what xgrammar treats as non-text tokens)."""
    from gptoss_cluster.workers.harmony import VOCAB_FILE_NAME, Tokenizer, ensure_vocab_file

    vocab = [b""] * vocab_size
    if isinstance(tokenizer, Tokenizer):  # the o200k ranks file: much faster than decoding 200k ids one by one
        with open(ensure_vocab_file() / VOCAB_FILE_NAME, "rb") as f:
            for line in f:
                if line.strip():
                    token, rank = line.split()
                    if int(rank) < vocab_size:
                        vocab[int(rank)] = base64.b64decode(token)
        return vocab
    for i in range(vocab_size):
        if not tokenizer.is_special(i):
            vocab[i] = tokenizer.decode_bytes([i])
    return vocab


_EBNF_RULE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*) ::= (.*)")
_EBNF_CHAR_CLASS = re.compile(r"\(*\[(?:\\.|[^\]\\])*\]\)*")  # a rule whose body is one character class
# `X{lo, hi} "literal"`: a bounded repetition followed, in the same sequence, by a string literal
_EBNF_BOUNDED_REPEAT = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\{(\d+), (\d+)\} ("(?:\\.|[^"\\])+")')
MAX_CHAINED_REPEAT = 128


def chain_bounded_repeats(ebnf: str, max_extra: int = MAX_CHAINED_REPEAT) -> str:
    """Rewrite `X{lo, hi} L` (X a character-class rule, L a string literal, 0 < hi - lo <= max_extra) as
    `X{lo, lo} C_k` with k = hi - lo, `C_j ::= L | X C_(j-1)` and `C_0 ::= L`: the same language (X^lo, then 0..k
    more X, then L), so the same token masks, but each position of the chain is its own rule whose masks xgrammar
    precomputes at compile time. This is what JSON Schema strings with maxLength become
    (`"\"" chars{0, 24} "\""`): xgrammar keeps the repetition's count at run time and checks most of the vocabulary
    against it on every step inside such a string (1 to 80 ms per row on a 201k vocabulary, growing along the
    string), against well under 0.1 ms per row for the chain. Compile time stays about the same. Anything else is
    left as it is; string literals and character classes in the text are never touched."""
    rules: dict[str, str] = {}
    for line in ebnf.splitlines():
        m = _EBNF_RULE.fullmatch(line)
        if m:
            rules[m[1]] = m[2]
    char_rules = {name for name, body in rules.items() if _EBNF_CHAR_CLASS.fullmatch(body)}
    chains: dict[tuple[str, int, str], str] = {}

    def rewrite(body: str) -> str:
        out, i, n = [], 0, len(body)
        while i < n:
            c = body[i]
            if c in '"[':  # a literal or a character class: copy it whole
                close, j = ('"' if c == '"' else "]"), i + 1
                while j < n and body[j] != close:
                    j += 2 if body[j] == "\\" else 1
                out.append(body[i:j + 1])
                i = j + 1
                continue
            m = _EBNF_BOUNDED_REPEAT.match(body, i) if (i == 0 or not (body[i - 1].isalnum()
                                                                      or body[i - 1] == "_")) else None
            if (m is None or m[1] not in char_rules or not 0 < int(m[3]) - int(m[2]) <= max_extra
                    or body[m.end():m.end() + 1] in ("*", "+", "?", "{")):  # L itself repeated: not `X{..} L`
                out.append(c)
                i += 1
                continue
            name, lo, k, literal = m[1], int(m[2]), int(m[3]) - int(m[2]), m[4]
            key = (name, k, literal)
            if key not in chains:
                base = f"{name}_chain{k}_{len(chains)}"
                while any(r.startswith(base) for r in rules):
                    base += "_"
                chains[key] = base
            chain = f"{chains[key]}_{k}"
            out.append(f"{name}{{{lo}, {lo}}} {chain}" if lo else chain)
            i = m.end()
        return "".join(out)

    lines = []
    for line in ebnf.splitlines():
        m = _EBNF_RULE.fullmatch(line)
        lines.append(f"{m[1]} ::= {rewrite(m[2])}" if m else line)
    if not chains:
        return ebnf
    for (name, k, literal), base in chains.items():
        lines += [f"{base}_{j} ::= ({literal} | ({name} {base}_{j - 1}))" for j in range(k, 0, -1)]
        lines.append(f"{base}_0 ::= ({literal})")
    return "\n".join(lines)


def _bits(token_ids: Sequence[int] | np.ndarray, words: int) -> np.ndarray:
    """A bitmask row (int32 [words]) with exactly `token_ids` set."""
    row = np.zeros(words, dtype=np.uint32)
    ids = np.asarray(token_ids, dtype=np.int64)
    np.bitwise_or.at(row, ids >> 5, (np.uint32(1) << (ids & 31).astype(np.uint32)))
    return row.view(np.int32)


def _finish_trie(node: _TrieNode) -> None:
    node.allowed = np.asarray(sorted(node.children), dtype=np.int64)
    for child in node.children.values():
        _finish_trie(child)
