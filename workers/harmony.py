"""Tokenizer and harmony chat format for gpt-oss: vocabulary loading, rendering prompts, parsing completions.

Everything format-related goes through openai-harmony (the reference implementation) rather than hand-written
templates, so the prompt the model sees is byte-for-byte what it was trained on. This module adds:
- offline, hash-checked loading of the o200k_base vocabulary shipped in the bpe-openai wheel;
- a small `Tokenizer` with id validation and an `IncrementalDetokenizer` that never splits a UTF-8 character;
- OpenAI-style message dicts -> harmony `Conversation` -> prompt token ids, with input validation that names the
  offending message/field;
- batch and streaming parsing of generated tokens into (channel, recipient, content_type, text).
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.resources
import json
import operator
import os
import re
import tempfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

__all__ = [
    "O200K_BASE_SHA256",
    "VocabularyError",
    "Tokenizer",
    "IncrementalDetokenizer",
    "ParsedMessage",
    "StreamEvent",
    "HarmonyStreamParser",
    "ensure_vocab_file",
    "get_encoding",
    "get_tokenizer",
    "build_conversation",
    "render_conversation",
    "render_chat",
    "render_chat_text",
    "parse_completion",
]

# sha256 of the *unzipped* o200k_base.tiktoken. Checked once per process: a truncated or tampered vocabulary would
# otherwise silently produce wrong token ids.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_FILE_NAME = "o200k_base.tiktoken"

# The model's embedding/unembedding size: 199998 ordinary o200k ranks + 1090 special/reserved ids. Harmony also
# knows <|reserved_201088|>, which the model cannot produce, so ids are validated against this, not harmony.
MODEL_VOCAB_SIZE = 201088

RETURN_ID = 200002  # <|return|>: end of the final answer; generation stops
CONSTRAIN_ID = 200003  # <|constrain|>
CHANNEL_ID = 200005  # <|channel|>
START_ID = 200006  # <|start|>
END_ID = 200007  # <|end|>: closes a message (e.g. analysis) -- NOT a stop token for generation
MESSAGE_ID = 200008  # <|message|>
CALL_ID = 200012  # <|call|>: end of a tool call; generation stops
PAD_ID = 199999  # <|endoftext|>
# Tokens that close a message in a completion.
_MESSAGE_END_IDS = frozenset({END_ID, RETURN_ID, CALL_ID})

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
_CHANNELS = ("analysis", "commentary", "final")
_BUILTIN_TOOLS = ("browser", "python")
_ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's rule for function names; it also keeps '.', whitespace and '<|' out of harmony recipients.
_FUNCTION_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOOL_DEF_KEYS = frozenset({"name", "description", "parameters", "strict"})


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary could not be found, verified or cached."""


# ----------------------------------------------------------------------------------------------------- vocabulary
def _cache_dir() -> Path:
    root = os.environ.get("GPTOSS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gptoss-cluster")
    return Path(root) / "tiktoken"


def _sha256_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _packaged_vocab_bytes() -> bytes:
    try:
        resource = importlib.resources.files("bpe_openai") / "data" / (VOCAB_FILE_NAME + ".gz")
        data = gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError, EOFError) as e:
        raise VocabularyError(
            f"cannot read bpe_openai/data/{VOCAB_FILE_NAME}.gz (is the 'bpe-openai' package installed?): {e}"
        ) from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise VocabularyError(
            f"bpe_openai/data/{VOCAB_FILE_NAME}.gz unzips to sha256 {digest}, expected {O200K_BASE_SHA256}; "
            "refusing to tokenize with an unverified vocabulary"
        )
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    # Temp file in the same folder + rename: concurrent processes each write their own temp file and the rename is
    # atomic, so a reader never sees a half-written vocabulary.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; the cache may be shared by users of one host
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@functools.cache
def ensure_vocab_file() -> Path:
    """Return a folder holding a verified o200k_base.tiktoken and point TIKTOKEN_ENCODINGS_BASE at it.

    Never touches the network: the vocabulary comes from the bpe-openai wheel. Hash-checked once per process.
    """
    existing = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if existing and _sha256_file(Path(existing) / VOCAB_FILE_NAME) == O200K_BASE_SHA256:
        return Path(existing)
    folder = _cache_dir()
    target = folder / VOCAB_FILE_NAME
    if _sha256_file(target) != O200K_BASE_SHA256:  # missing or corrupt: (re)write it
        try:
            _write_atomically(target, _packaged_vocab_bytes())
        except OSError as e:
            raise VocabularyError(
                f"cannot write the vocabulary cache {target} ({e}); set GPTOSS_CACHE_DIR to a writable folder"
            ) from e
        if _sha256_file(target) != O200K_BASE_SHA256:
            raise VocabularyError(f"vocabulary cache {target} does not match sha256 {O200K_BASE_SHA256} after writing")
    # harmony's Rust loader reads this variable; without it it would try to download the file.
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    return folder


@functools.cache
def get_encoding() -> HarmonyEncoding:
    """The harmony gpt-oss encoding, loaded once per process from the verified offline vocabulary."""
    ensure_vocab_file()
    try:
        enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        raise VocabularyError(f"openai-harmony failed to load the gpt-oss encoding: {e}") from e
    # Guard the invariants the serving stack relies on; a different harmony release could change them.
    stops = set(enc.stop_tokens_for_assistant_actions())
    if stops != {RETURN_ID, CALL_ID}:
        raise VocabularyError(f"unexpected harmony assistant stop tokens {sorted(stops)}")
    return enc


# ------------------------------------------------------------------------------------------------------ tokenizer
def _as_token_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    out: list[int] = []
    for i in ids:
        if isinstance(i, bool):
            raise ValueError(f"token id must be an integer, got {i!r}")
        try:
            out.append(operator.index(i))
        except TypeError:
            raise ValueError(f"token id must be an integer, got {i!r}") from None
    if out and (min(out) < 0 or max(out) >= vocab_size):
        bad = next(i for i in out if i < 0 or i >= vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out


class Tokenizer:
    """o200k_harmony tokenizer (via openai-harmony) with the model's vocabulary size and stop tokens."""

    def __init__(self, encoding: HarmonyEncoding | None = None) -> None:
        self._enc = encoding if encoding is not None else get_encoding()
        # Special tokens are the ids above the ordinary o200k ranks; map their text once for token_id().
        first_special = 199998
        self._special_ids = {self._enc.decode([i]): i for i in range(first_special, MODEL_VOCAB_SIZE)}

    @property
    def encoding(self) -> HarmonyEncoding:
        """The underlying openai_harmony encoding (for rendering/parsing and tests)."""
        return self._enc

    @property
    def vocab_size(self) -> int:
        return MODEL_VOCAB_SIZE

    @property
    def eos_token_id(self) -> int:
        return RETURN_ID

    @property
    def pad_token_id(self) -> int:
        return PAD_ID

    @property
    def stop_token_ids_for_chat(self) -> list[int]:
        """<|return|> and <|call|>; never <|end|>, which only closes the analysis message before the answer."""
        return sorted(self._enc.stop_tokens_for_assistant_actions())

    def encode(self, text: str, *, allow_special_tokens: bool = False) -> list[int]:
        """Plain text -> ids. Special-token text (e.g. "<|start|>") in user text is encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        if allow_special_tokens:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> raw bytes (a token may hold only part of a UTF-8 character)."""
        # surrogateescape round-trips undecodable bytes exactly, using only harmony's public decode().
        text = self._enc.decode(_as_token_ids(ids, MODEL_VOCAB_SIZE), errors="surrogateescape")
        return text.encode("utf-8", errors="surrogateescape")

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text; invalid UTF-8 (a character cut at the end) becomes U+FFFD."""
        token_ids = _as_token_ids(ids, MODEL_VOCAB_SIZE)
        if skip_special_tokens:
            token_ids = [i for i in token_ids if not self._enc.is_special_token(i)]
        return self._enc.decode(token_ids, errors="replace")

    def token_id(self, token: str) -> int:
        """Id of a special token given its text, e.g. token_id("<|end|>") == 200007."""
        try:
            return self._special_ids[token]
        except (KeyError, TypeError):
            raise ValueError(f"{token!r} is not a special token of the harmony vocabulary") from None

    def is_special(self, token_id: int) -> bool:
        (tid,) = _as_token_ids([token_id], MODEL_VOCAB_SIZE)
        return self._enc.is_special_token(tid)


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (loading the vocabulary takes ~0.5 s, so do it once)."""
    return Tokenizer()


# What each token decodes to and whether it is special, per tokenizer: the router detokenizes every streamed token,
# and a dict lookup costs a fraction of a call into harmony (the decoding of a token never changes).
_TOKEN_CACHES: weakref.WeakKeyDictionary[Tokenizer, tuple[dict[int, bytes], dict[int, bool]]] = \
    weakref.WeakKeyDictionary()


def _token_caches(tokenizer: Tokenizer) -> tuple[dict[int, bytes], dict[int, bool]]:
    caches = _TOKEN_CACHES.get(tokenizer)
    if caches is None:
        caches = _TOKEN_CACHES[tokenizer] = ({}, {})
    return caches


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back bytes of a UTF-8 character split across tokens.

    `add(ids)` returns only complete characters, so a multi-byte character never surfaces as U+FFFD mid-stream;
    `flush()` emits whatever is left at the end (U+FFFD only if the stream really ended inside a character).
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._skip_special = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bytes, self._special = _token_caches(self._tok)

    def _token_bytes(self, token_id: int) -> bytes:
        data = self._bytes.get(token_id)
        if data is None:  # first sight of this id: decode_bytes validates it (range) before it is cached
            data = self._bytes[token_id] = self._tok.decode_bytes([token_id])
        return data

    def _is_special(self, token_id: int) -> bool:
        special = self._special.get(token_id)
        if special is None:
            special = self._special[token_id] = self._tok.is_special(token_id)
        return special

    def add(self, ids: int | Sequence[int]) -> str:
        """Append one id or a chunk of ids; returns the newly completed text (possibly "")."""
        token_ids: Sequence[int]
        if type(ids) is int:  # the streaming cases first: one plain id, a list of them
            token_ids = (ids,)
        elif type(ids) is list and all(type(i) is int for i in ids):
            token_ids = ids
        else:
            try:
                token_ids = [operator.index(ids)]  # a single id (numpy/torch integer scalar)
            except TypeError:
                token_ids = _as_token_ids(ids, MODEL_VOCAB_SIZE)
        if self._skip_special:
            token_ids = [i for i in token_ids if not self._is_special(i)]
        if len(token_ids) == 1:
            data = self._token_bytes(token_ids[0])
        else:
            data = b"".join([self._token_bytes(i) for i in token_ids])
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out


# ------------------------------------------------------------------------------------------------------ rendering
def _message_error(index: int, problem: str) -> ValueError:
    return ValueError(f"messages[{index}]: {problem}")


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _tool_description(index: int, tool: Any) -> ToolDescription:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where} must be an object, got {type(tool).__name__}")
    if "function" in tool or "type" in tool:  # OpenAI wrapped form {"type": "function", "function": {...}}
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type must be 'function', got {tool.get('type')!r}")
        extra = set(tool) - {"type", "function"}
        if extra:
            raise ValueError(f"{where} has unknown field(s) {sorted(extra)}")
        tool = tool.get("function")
        where += ".function"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where} must be an object, got {type(tool).__name__}")
    extra = set(tool) - _TOOL_DEF_KEYS
    if extra:
        raise ValueError(f"{where} has unknown field(s) {sorted(extra)}")
    name = tool.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME_RE.match(name):
        raise ValueError(f"{where}.name must match {_FUNCTION_NAME_RE.pattern}, got {name!r}")
    description = tool.get("description")
    if description is None:
        description = ""
    _require_str(description, f"{where}.description")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.parameters must be a JSON schema object, got {type(parameters).__name__}")
    return ToolDescription.new(name, description, dict(parameters) if parameters is not None else None)


def _recipient_for(name: str, builtin: Sequence[str]) -> str:
    # A bare function name lives in the `functions` namespace; an already-qualified name ("functions.f",
    # "browser.search") and the built-in python tool are used as given.
    if "." in name or (name == "python" and "python" in builtin):
        return name
    return f"functions.{name}"


def _tool_calls(index: int, calls: Any, builtin: Sequence[str]) -> list[Message]:
    if not isinstance(calls, list):
        raise _message_error(index, f"tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        where = f"tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise _message_error(index, f"{where} must be an object, got {type(call).__name__}")
        fn = call.get("function", call)  # OpenAI form nests name/arguments under "function"
        if not isinstance(fn, Mapping):
            raise _message_error(index, f"{where}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "<|" in name:
            raise _message_error(index, f"{where}.name must be a non-empty tool name, got {name!r}")
        arguments = fn.get("arguments", "")
        if isinstance(arguments, Mapping):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise _message_error(index, f"{where}.arguments must be a JSON string, got {type(arguments).__name__}")
        recipient = _recipient_for(name, builtin)
        if recipient.startswith("functions."):
            channel, content_type = "commentary", "<|constrain|>json"
        else:  # built-in tools (browser.*, python) are called from the analysis channel with code content
            channel, content_type = "analysis", "code"
        channel = call.get("channel", channel)
        if channel not in _CHANNELS:
            raise _message_error(index, f"{where}.channel must be one of {_CHANNELS}, got {channel!r}")
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, arguments)
            .with_channel(channel)
            .with_recipient(recipient)
            .with_content_type(content_type)
        )
    return out


def _assistant_messages(index: int, msg: Mapping[str, Any], builtin: Sequence[str]) -> list[Message]:
    out: list[Message] = []
    if "reasoning" in msg and "reasoning_content" in msg:
        raise _message_error(index, "give either 'reasoning' or 'reasoning_content', not both")
    reasoning = msg.get("reasoning", msg.get("reasoning_content"))
    if reasoning is not None:
        _require_str(reasoning, f"messages[{index}].reasoning")
        if reasoning:
            # harmony drops analysis that precedes a later final message (auto_drop_analysis); we only build it.
            out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    calls = msg.get("tool_calls") or []
    content = msg.get("content")
    if content is not None:
        _require_str(content, f"messages[{index}].content")
        channel = msg.get("channel")
        if channel is None:
            # Text next to tool calls is a preamble (commentary); otherwise it is the answer.
            channel = "commentary" if calls else "final"
        elif channel not in _CHANNELS:
            raise _message_error(index, f"channel must be one of {_CHANNELS}, got {channel!r}")
        if content or not (out or calls):
            out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel))
    out.extend(_tool_calls(index, calls, builtin))
    if not out:
        raise _message_error(index, "assistant message has no content, reasoning or tool_calls")
    return out


def _tool_message(index: int, msg: Mapping[str, Any], builtin: Sequence[str], call_names: Mapping[str, str]) -> Message:
    name = msg.get("name")
    call_id = msg.get("tool_call_id")
    # OpenAI clients identify the call by id only: recover the name from the assistant's earlier tool_calls.
    if name is None and isinstance(call_id, str) and call_id in call_names:
        name = call_names[call_id]
    if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "<|" in name:
        raise _message_error(index, f"tool message needs 'name' (the function that produced it), got {name!r}")
    content = _require_str(msg.get("content"), f"messages[{index}].content")
    author = _recipient_for(name, builtin)
    channel = msg.get("channel", "commentary" if author.startswith("functions.") else "analysis")
    if channel not in _CHANNELS:
        raise _message_error(index, f"channel must be one of {_CHANNELS}, got {channel!r}")
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, author), content)
        .with_channel(channel)
        .with_recipient("assistant")
    )


def build_conversation(
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    developer_instructions: str | None = None,
    builtin_tools: Sequence[str] | None = None,
    model_identity: str | None = None,
    knowledge_cutoff: str | None = None,
    conversation_start_date: str | None = None,
) -> Conversation:
    """OpenAI-style chat messages -> a harmony Conversation (system + optional developer message + turns).

    - "system" and "developer" content (and `developer_instructions`) become DeveloperContent instructions, in that
      order: OpenAI-style clients put their instructions in the system message, and harmony's system header is
      reserved for identity, dates, reasoning effort and built-in tools (as the Hugging Face chat template does);
      `model_identity` sets harmony's identity line; `tools` become the developer message's
      `functions` namespace; `builtin_tools` ("browser", "python") go into the system message;
    - assistant dicts may carry "reasoning" (analysis), "channel" and "tool_calls"; tool dicts need "name".
    Raises ValueError naming the offending message index / field.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")

    effort_key = reasoning_effort.lower() if isinstance(reasoning_effort, str) else None
    if effort_key not in _EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {sorted(_EFFORTS)}, got {reasoning_effort!r}")
    if isinstance(builtin_tools, str):
        raise ValueError(f"builtin_tools must be a list such as ['browser'], got the string {builtin_tools!r}")
    builtin = list(builtin_tools or [])
    for name in builtin:
        if name not in _BUILTIN_TOOLS:
            raise ValueError(f"builtin_tools entries must be one of {_BUILTIN_TOOLS}, got {name!r}")
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
        raise ValueError(f"tools must be a list of function definitions, got {type(tools).__name__}")
    descriptions = [_tool_description(i, t) for i, t in enumerate(tools or [])]
    seen: set[str] = set()
    for d in descriptions:
        if d.name in seen:
            raise ValueError(f"tools: duplicate function name {d.name!r}")
        seen.add(d.name)
    if developer_instructions is not None:
        _require_str(developer_instructions, "developer_instructions")

    identity = model_identity
    system_instructions: str | None = None
    instructions = developer_instructions
    turns: list[Message] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _message_error(i, f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in _ROLES:
            raise _message_error(i, f"unknown role {role!r} (expected one of {_ROLES})")
        if role in ("system", "developer"):
            # harmony has exactly one system and one developer header, both before the conversation.
            if turns:
                raise _message_error(i, f"a {role} message must come before all user/assistant/tool messages")
            content = _require_str(msg.get("content"), f"messages[{i}].content")
            if role == "system":
                if system_instructions is not None:
                    raise _message_error(i, "a second system message (give one)")
                system_instructions = content
            else:
                if instructions is not None:
                    raise _message_error(
                        i, "developer instructions given twice (second developer message or developer_instructions)"
                    )
                instructions = content
        elif role == "user":
            content = _require_str(msg.get("content"), f"messages[{i}].content")
            turns.append(Message.from_role_and_content(Role.USER, content))
        elif role == "assistant":
            calls = msg.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, Mapping) and isinstance(call.get("id"), str):
                    fn = call.get("function", call)
                    if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                        call_names[call["id"]] = fn["name"]
            turns.extend(_assistant_messages(i, msg, builtin))
        else:
            turns.append(_tool_message(i, msg, builtin, call_names))
    if not turns:
        raise ValueError("messages has no user, assistant or tool message")
    if system_instructions is not None:
        instructions = system_instructions if instructions is None else f"{system_instructions}\n\n{instructions}"

    system = SystemContent.new().with_reasoning_effort(_EFFORTS[effort_key])
    if identity is not None:
        system = system.with_model_identity(identity)
    if knowledge_cutoff is not None:
        system = system.with_knowledge_cutoff(_require_str(knowledge_cutoff, "knowledge_cutoff"))
    if conversation_start_date is not None:
        system = system.with_conversation_start_date(_require_str(conversation_start_date, "conversation_start_date"))
    for name in dict.fromkeys(builtin):
        system = system.with_browser_tool() if name == "browser" else system.with_python_tool()
    header = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions is not None or descriptions:
        developer = DeveloperContent.new()
        if instructions is not None:
            developer = developer.with_instructions(instructions)
        if descriptions:
            developer = developer.with_function_tools(descriptions)
        header.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(header + turns)


def render_conversation(conversation: Conversation) -> list[int]:
    """A harmony Conversation -> prompt ids ending in `<|start|>assistant`, ready for the model to complete."""
    try:
        return get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    except HarmonyError as e:
        raise ValueError(f"harmony cannot render this conversation: {e}") from e


def render_chat(messages: Sequence[Mapping[str, Any]], **options: Any) -> list[int]:
    """OpenAI-style messages -> prompt token ids ending in `<|start|>assistant`; `options` are build_conversation's
    keywords (reasoning_effort, tools, developer_instructions, builtin_tools, model_identity, ...), passed on as is so
    that they are declared once."""
    return render_conversation(build_conversation(messages, **options))


def render_chat_text(messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
    """The rendered prompt as text, special tokens spelled out (for logs and debugging); options as render_chat."""
    return get_tokenizer().decode(render_chat(messages, **options))


# -------------------------------------------------------------------------------------------------------- parsing
def _clean_header_field(value: str | None) -> tuple[str | None, str | None]:
    """Split a header field that swallowed a special token (e.g. "functions.f<|channel|>commentary").

    Returns (clean value, channel named inside it if any): channel markers must not leak into tool names.
    """
    if value is None:
        return None, None
    head, sep, tail = value.partition("<|")
    leaked_channel = None
    if sep:
        m = re.search(r"<\|channel\|>\s*([A-Za-z]+)", sep + tail)
        leaked_channel = m.group(1) if m else None
    head = head.strip().split()[0] if head.strip() else ""
    return (head or None), leaked_channel


@dataclass(frozen=True)
class ParsedMessage:
    """One message of a completion. `recipient` set on an assistant message means a tool call."""

    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str
    role: str = "assistant"

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and self.recipient is not None

    @property
    def function_name(self) -> str | None:
        """The function name for a `functions.NAME` recipient (e.g. get_weather); None for other recipients."""
        if self.recipient is not None and self.recipient.startswith("functions."):
            return self.recipient[len("functions."):]
        return None


def _clean_message_header(
    channel: str | None, recipient: str | None, content_type: str | None
) -> tuple[str | None, str | None, str | None]:
    recipient, leaked = _clean_header_field(recipient)
    channel, leaked_from_channel = _clean_header_field(channel)
    channel = channel or leaked or leaked_from_channel
    if content_type is not None:
        content_type = content_type.strip() or None
    return channel, recipient, content_type


def _content_spans(tokens: Sequence[int]) -> list[list[int]]:
    """Content token ids of each complete-header message, mirroring harmony's message boundaries."""
    spans: list[list[int]] = []
    current: list[int] = []
    for t in tokens:
        if t in _MESSAGE_END_IDS:
            spans.append(current)
            current = []
        else:
            current.append(t)
    if current:
        spans.append(current)
    out = []
    for span in spans:
        if MESSAGE_ID in span:
            out.append(span[span.index(MESSAGE_ID) + 1:])
    return out


def _trim_incomplete_header(tokens: list[int]) -> list[int]:
    # A completion cut by max_tokens can end inside a header ("<|start|>assistant<|channel|>fin"); that message
    # has no content yet, so drop it instead of failing the whole parse.
    last_end = max((i for i, t in enumerate(tokens) if t in _MESSAGE_END_IDS), default=-1)
    if MESSAGE_ID not in tokens[last_end + 1:]:
        tokens = tokens[: last_end + 1]
    # A completion that is only stop tokens (the model stopped immediately) holds no message.
    if all(t in _MESSAGE_END_IDS for t in tokens):
        return []
    return tokens


def parse_completion(token_ids: Sequence[int]) -> list[ParsedMessage]:
    """Generated ids (after the prompt's `<|start|>assistant`) -> messages; a trailing stop token is fine.

    Special tokens the model emitted inside message content are dropped from `text` (they are not text).
    Raises ValueError for out-of-range ids or token sequences that do not follow the harmony grammar.
    """
    tokens = _trim_incomplete_header(_as_token_ids(token_ids, MODEL_VOCAB_SIZE))
    if not tokens:
        return []
    enc = get_encoding()
    try:
        messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except HarmonyError as e:
        raise ValueError(f"completion is not valid harmony: {e}") from e
    spans = _content_spans(tokens)
    tok = get_tokenizer()
    out = []
    for k, m in enumerate(messages):
        if len(spans) == len(messages):
            text = tok.decode(spans[k], skip_special_tokens=True)
        else:  # boundaries disagree (should not happen): trust harmony's text
            text = "".join(getattr(c, "text", "") for c in m.content)
        channel, recipient, content_type = _clean_message_header(m.channel, m.recipient, m.content_type)
        out.append(ParsedMessage(channel, recipient, content_type, text, m.author.role.value))
    return out


@dataclass(frozen=True)
class StreamEvent:
    """A text delta of message `message_index`, or (done=True) the end of that message with its full form."""

    channel: str | None
    recipient: str | None
    content_type: str | None
    delta: str
    message_index: int
    done: bool = False
    message: ParsedMessage | None = None

    @property
    def is_tool_call(self) -> bool:
        return self.recipient is not None


class HarmonyStreamParser:
    """Token-by-token harmony parser for streaming: tags every text delta with its channel and recipient.

    A router forwards `final` deltas as answer text, `analysis` as reasoning, and treats any delta or finished
    message with a recipient (e.g. "functions.get_weather", possibly on the analysis channel) as a tool call.
    """

    def __init__(self, tokenizer: Tokenizer | None = None) -> None:
        self._tok = tokenizer if tokenizer is not None else get_tokenizer()
        self._parser = StreamableParser(self._tok.encoding, Role.ASSISTANT)
        self._index = 0  # index of the message being parsed
        self._text: list[str] = []  # deltas of the current message
        self._messages: list[ParsedMessage] = []
        self._finished = False
        self._special = _token_caches(self._tok)[1]
        # The cleaned header of the content being parsed: only a special token (<|message|>, <|end|>, ...) can
        # change it, so it is read from the parser once per message rather than once per token.
        self._header: tuple[str | None, str | None, str | None] | None = None

    @property
    def messages(self) -> list[ParsedMessage]:
        """Messages completed so far."""
        return list(self._messages)

    def feed(self, token_id: int) -> list[StreamEvent]:
        """Process one generated token; returns the resulting events (usually zero or one)."""
        if self._finished:
            raise ValueError("feed() after finish()")
        if type(token_id) is int and 0 <= token_id < MODEL_VOCAB_SIZE:
            tid = token_id
        else:
            (tid,) = _as_token_ids([token_id], MODEL_VOCAB_SIZE)
        special = self._special.get(tid)
        if special is None:
            special = self._special[tid] = self._tok.encoding.is_special_token(tid)
        was_content = special and self._parser.state == StreamState.CONTENT
        if special:
            self._header = None
        try:
            self._parser.process(tid)
        except HarmonyError as e:
            raise ValueError(f"token {tid} breaks the harmony grammar: {e}") from e
        events: list[StreamEvent] = []
        delta = self._parser.last_content_delta
        # A special token inside content is a model glitch, not text: never forward its spelling.
        if delta and not special:
            header = self._header
            if header is None:
                header = self._header = _clean_message_header(
                    self._parser.current_channel, self._parser.current_recipient, self._parser.current_content_type
                )
            self._text.append(delta)
            events.append(StreamEvent(*header, delta, self._index))
        if was_content and tid in _MESSAGE_END_IDS:
            events.append(self._close_message())
        return events

    def feed_many(self, token_ids: Iterable[int]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for t in token_ids:
            events.extend(self.feed(t))
        return events

    def finish(self) -> list[StreamEvent]:
        """End of generation: closes a message cut short (no stop token); an incomplete header is dropped."""
        if self._finished:
            return []
        self._finished = True
        state = self._parser.state
        if state == StreamState.CONTENT:
            self._parser.process_eos()
            return [self._close_message()]
        return []  # EXPECT_START: nothing pending; HEADER: truncated inside a header, no content to report

    def _close_message(self) -> StreamEvent:
        last = self._parser.messages[-1]
        channel, recipient, content_type = _clean_message_header(last.channel, last.recipient, last.content_type)
        parsed = ParsedMessage(channel, recipient, content_type, "".join(self._text), last.author.role.value)
        self._messages.append(parsed)
        event = StreamEvent(channel, recipient, content_type, "", self._index, done=True, message=parsed)
        self._index += 1
        self._text = []
        return event
