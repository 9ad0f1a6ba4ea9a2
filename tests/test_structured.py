"""Constrained decoding in the engine (workers/engine/structured.py) on the tiny random-weights model.

Random weights make this a strong test: the model has no idea of JSON or harmony, so every valid answer below is the
constraint's doing.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from gptoss_cluster.workers.engine import Engine, EngineConfig
from gptoss_cluster.workers.engine.structured import Constraint, ResponseFormat, ToolSpec
from gptoss_cluster.workers.harmony import get_tokenizer, parse_completion, render_chat
from tests.structured_cases import GRAMMARS, REGEXES, SCHEMAS, TIME_TOOL, WEATHER_TOOL, full_match

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def engine(checkpoints, tok) -> Engine:
    return Engine.from_checkpoint(checkpoints["tiny-hf"], dtype=torch.float32, tokenizer=tok, progress=False,
                                  config=EngineConfig(num_blocks=2048, max_model_len=2048, max_num_seqs=64))


@pytest.fixture(scope="module")
def prompt():
    return render_chat([{"role": "user", "content": "Answer in JSON."}])


def run(engine: Engine, tok, prompt, constraints: list[Constraint], seed: int = 0, **sampling):
    params = {"temperature": 1.0, "max_tokens": MAX_TOKENS, **sampling}
    results = engine.generate([(prompt, {**params, "seed": seed + i}, tok.stop_token_ids_for_chat, c)
                               for i, c in enumerate(constraints)])
    return [(r, parse_completion(r.token_ids)) for r in results]


def analysis_tokens(tok, ids: list[int]) -> int:
    """How many tokens the analysis messages' bodies hold (between their <|message|> and <|end|>)."""
    header = [tok.token_id("<|channel|>"), *tok.encode("analysis"), tok.token_id("<|message|>")]
    count, i = 0, 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            i += len(header)
            while i < len(ids) and ids[i] != tok.token_id("<|end|>"):
                count, i = count + 1, i + 1
        i += 1
    return count


def schema_constraint(schema, budget):
    return Constraint(ResponseFormat("json_schema", json.dumps(schema)), max_reasoning_tokens=budget)


def tool_spec(tool, strict=True):
    return ToolSpec(f"functions.{tool['name']}", json.dumps(tool["parameters"]) if strict else None)


# ================================================================================================ JSON schemas
@pytest.mark.parametrize("budget", [0, 32])
def test_every_schema_validates(engine, tok, prompt, budget):
    out = run(engine, tok, prompt, [schema_constraint(s, budget) for s in SCHEMAS], seed=100 * budget)
    for schema, (result, messages) in zip(SCHEMAS, out, strict=True):
        assert result.finish_reason == "stop" and result.stop_reason == tok.token_id("<|return|>"), result
        final = [m for m in messages if m.channel == "final"]
        analysis = [m for m in messages if m.channel == "analysis"]
        assert len(final) == 1 and all(m.recipient is None for m in messages), messages
        jsonschema.validate(json.loads(final[0].text), schema)
        assert " " not in final[0].text.replace('" ', "").replace(' "', "") or '"' in final[0].text  # compact
        if budget == 0:
            assert not analysis, analysis
        else:
            assert len(analysis) <= 1 and analysis_tokens(tok, result.token_ids) <= budget, analysis


def test_reasoning_budget_is_exact_when_the_model_does_not_stop(engine, tok, prompt):
    """The budget counts analysis tokens; at the budget <|end|> is forced, then the final answer starts."""
    constraint = schema_constraint(SCHEMAS[3], 16)
    (result, messages), = run(engine, tok, prompt, [constraint], seed=7)
    ids = result.token_ids
    header = [tok.token_id("<|channel|>"), *tok.encode("analysis"), tok.token_id("<|message|>")]
    if ids[:len(header)] == header:  # the model chose to reason
        body = ids[len(header):ids.index(tok.token_id("<|end|>"))]
        assert len(body) <= 16 and all(not tok.is_special(t) for t in body)
        assert analysis_tokens(tok, ids) == len(body)
    assert messages[-1].channel == "final"
    jsonschema.validate(json.loads(messages[-1].text), SCHEMAS[3])


@pytest.mark.parametrize("budget", [0, 32])
def test_regex_and_grammar(engine, tok, prompt, budget):
    constraints = [Constraint(ResponseFormat("regex", r), max_reasoning_tokens=budget) for r in REGEXES]
    constraints += [Constraint(ResponseFormat("grammar", g), max_reasoning_tokens=budget) for g, _ in GRAMMARS]
    patterns = REGEXES + [p for _, p in GRAMMARS]
    for pattern, (result, messages) in zip(patterns, run(engine, tok, prompt, constraints, seed=5), strict=True):
        assert result.finish_reason == "stop"
        assert full_match(pattern, messages[-1].text) and messages[-1].channel == "final", (pattern, messages)


def test_json_object(engine, tok, prompt):
    (result, messages), = run(engine, tok, prompt, [Constraint(ResponseFormat("json_object"),
                                                                max_reasoning_tokens=0)], seed=3, max_tokens=600)
    if result.finish_reason == "stop":  # any JSON object may be long: only a finished one can be checked
        assert isinstance(json.loads(messages[-1].text), dict)
    else:
        assert messages[-1].text.startswith("{")


# ================================================================================================ tools
def test_tool_choice_required_and_named_always_call(engine, tok, prompt):
    tools = (tool_spec(WEATHER_TOOL), tool_spec(TIME_TOOL))
    constraints = [Constraint(tools=tools, tool_choice="required", max_reasoning_tokens=b) for b in (0, 8, 0, 8)]
    constraints += [Constraint(tools=tools, tool_choice="functions.get_time", max_reasoning_tokens=b)
                    for b in (0, 8, 0, 8)]
    for i, (result, messages) in enumerate(run(engine, tok, prompt, constraints, seed=11)):
        assert result.finish_reason == "stop" and result.stop_reason == tok.token_id("<|call|>"), result
        call = messages[-1]
        assert call.recipient is not None and call.channel == "commentary", messages
        if i >= 4:
            assert call.recipient == "functions.get_time"
        schema = {"functions.get_weather": WEATHER_TOOL, "functions.get_time": TIME_TOOL}[call.recipient]
        jsonschema.validate(json.loads(call.text), schema["parameters"])
        assert all(m.recipient is None for m in messages[:-1])


def test_tool_choice_none_never_calls(engine, tok, prompt):
    tools = (tool_spec(WEATHER_TOOL), tool_spec(TIME_TOOL, strict=False))
    constraints = [Constraint(ResponseFormat("json_schema", json.dumps(SCHEMAS[0])), tools=tools, tool_choice="none",
                              max_reasoning_tokens=4)] * 4
    for _, messages in run(engine, tok, prompt, constraints, seed=21):
        assert all(m.recipient is None for m in messages) and messages[-1].channel == "final", messages
        jsonschema.validate(json.loads(messages[-1].text), SCHEMAS[0])


def test_auto_lets_the_model_choose_between_answer_and_call(engine, tok, prompt):
    tools = (tool_spec(WEATHER_TOOL),)
    constraints = [Constraint(ResponseFormat("json_schema", json.dumps(SCHEMAS[3])), tools=tools,
                              max_reasoning_tokens=0)] * 12
    kinds = set()
    for _, messages in run(engine, tok, prompt, constraints, seed=31):
        last = messages[-1]
        if last.recipient is not None:
            assert last.recipient == "functions.get_weather"
            jsonschema.validate(json.loads(last.text), WEATHER_TOOL["parameters"])
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(last.text), SCHEMAS[3])
            kinds.add("answer")
    assert kinds, "no completion"


def test_non_strict_function_arguments_are_a_json_object(engine, tok, prompt):
    constraint = Constraint(tools=(tool_spec(WEATHER_TOOL, strict=False),), tool_choice="required",
                            max_reasoning_tokens=0)
    (result, messages), = run(engine, tok, prompt, [constraint], seed=2, max_tokens=600)
    assert messages[-1].recipient == "functions.get_weather"
    assert messages[-1].text.startswith("{")


def test_builtin_tools_come_back_with_their_recipients(engine, tok):
    prompt = render_chat([{"role": "user", "content": "Search the web."}], builtin_tools=["browser", "python"])
    browser = tuple(ToolSpec(r) for r in ("browser.search", "browser.open", "browser.find"))
    constraints = [Constraint(tools=browser + (ToolSpec("python"),), tool_choice="required", max_reasoning_tokens=0),
                   Constraint(tools=browser + (ToolSpec("python"),), tool_choice="python", max_reasoning_tokens=0),
                   Constraint(tools=browser, tool_choice="browser.search", max_reasoning_tokens=0)]
    out = run(engine, tok, prompt, constraints, seed=41, max_tokens=48)
    recipients = [messages[-1].recipient if messages else None for _, messages in out]
    assert recipients[0] in {"browser.search", "browser.open", "browser.find", "python"}
    assert recipients[1] == "python" and recipients[2] == "browser.search"
    assert out[2][1][-1].channel == "analysis"  # harmony calls its built-in tools from the analysis channel


# ================================================================================================ the masks
# strings with bounds, nested, beside an enum whose text looks like a bounded repetition before a literal
BOUNDED = {"type": "object", "properties": {
    "a": {"type": "string", "minLength": 3, "maxLength": 9},
    "b": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    "c": {"enum": ['x{0, 2} "q"', "y"]}}, "required": ["a", "b", "c"]}


@pytest.mark.parametrize("schema", [BOUNDED, SCHEMAS[0], SCHEMAS[7], SCHEMAS[16]])
def test_chained_repeats_give_xgrammar_s_own_masks(engine, schema):
    """The rewritten grammar (bounded strings as chains of rules) allows exactly what xgrammar's own compile of the
    schema allows, step by step along random walks that run strings to their bounds and end them early."""
    import numpy as np
    import xgrammar as xgr

    d = engine.structured
    text = json.dumps(schema)
    ours = d._grammar(ResponseFormat("json_schema", text), "test")
    theirs = d.json_compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"), strict_mode=True)
    assert "_chain" in str(ours.grammar)
    rng = np.random.default_rng(0)
    a, b = d.allocate_bitmask(1), d.allocate_bitmask(1)
    for _ in range(3):
        m_ours = xgr.GrammarMatcher(ours, override_stop_tokens=[d.RETURN])
        m_theirs = xgr.GrammarMatcher(theirs, override_stop_tokens=[d.RETURN])
        for _ in range(80):
            m_ours.fill_next_token_bitmask(a, 0)
            m_theirs.fill_next_token_bitmask(b, 0)
            assert torch.equal(a, b)
            allowed = np.flatnonzero(np.unpackbits(b.numpy().view(np.uint8), count=d.vocab_size, bitorder="little"))
            token = int(rng.choice(allowed))
            if token == d.RETURN:
                break
            assert m_ours.accept_token(token) and m_theirs.accept_token(token)


def test_chain_bounded_repeats_rewrites_only_bounded_character_repeats():
    from gptoss_cluster.workers.engine.structured import chain_bounded_repeats

    ebnf = "\n".join([
        r'root ::= (("\"" c{2, 5} "\"" c{0, 3} "x{0, 3} \"y\"" c{4, 4} "z" "c{0, 3} \"q\"" w{0, 2} "q" '
        r'c{0, -1} "\""))',
        r'c ::= (([^\"\\\r\n]))',
        r'w ::= (("ab" c))',
    ])
    out = chain_bounded_repeats(ebnf).splitlines()
    # each bounded repeat takes the literal after it into its chain; a literal's own text is never rewritten
    assert out[0] == (r'root ::= (("\"" c{2, 2} c_chain3_0_3 c_chain3_1_3 c{4, 4} "z" "c{0, 3} \"q\"" w{0, 2} "q" '
                      r'c{0, -1} "\""))')
    assert out[1:3] == ebnf.splitlines()[1:3]
    assert out[3:] == [r'c_chain3_0_3 ::= ("\"" | (c c_chain3_0_2))', r'c_chain3_0_2 ::= ("\"" | (c c_chain3_0_1))',
                       r'c_chain3_0_1 ::= ("\"" | (c c_chain3_0_0))', r'c_chain3_0_0 ::= ("\"")',
                       r'c_chain3_1_3 ::= ("x{0, 3} \"y\"" | (c c_chain3_1_2))',
                       r'c_chain3_1_2 ::= ("x{0, 3} \"y\"" | (c c_chain3_1_1))',
                       r'c_chain3_1_1 ::= ("x{0, 3} \"y\"" | (c c_chain3_1_0))', r'c_chain3_1_0 ::= ("x{0, 3} \"y\"")']
    assert chain_bounded_repeats(ebnf, max_extra=2).splitlines()[0].startswith(r'root ::= (("\"" c{2, 5} "\""')
    plain = 'root ::= (("a" c{0, 3}))\nc ::= (([a-z]))'  # no literal after the repetition: left alone
    assert chain_bounded_repeats(plain) == plain
    for postfix in ("*", "+", "?", "{1, 2}"):  # the literal itself repeated is not `X{..} L`: left alone
        repeated = f'root ::= (("a" c{{0, 3}} "q"{postfix}))\nc ::= (([a-z]))'
        assert chain_bounded_repeats(repeated) == repeated


# ================================================================================================ the engine around it
def test_unconstrained_rows_are_untouched(engine, tok, prompt):
    """A seeded unconstrained request samples the same tokens alone and beside constrained ones."""
    params = {"temperature": 1.0, "max_tokens": 12, "seed": 99}
    alone = engine.generate([(prompt, params, tok.stop_token_ids_for_chat)])[0].token_ids
    mixed = engine.generate([(prompt, params, tok.stop_token_ids_for_chat),
                             (prompt, {**params, "seed": 1}, tok.stop_token_ids_for_chat,
                              schema_constraint(SCHEMAS[0], 0))])
    assert mixed[0].token_ids == alone


def test_min_tokens_does_not_hold_a_finished_constraint_open(engine, tok, prompt):
    constraint = Constraint(ResponseFormat("grammar", 'root ::= "yes" | "no"'), max_reasoning_tokens=0)
    (result, messages), = run(engine, tok, prompt, [constraint], min_tokens=50)
    assert result.finish_reason == "stop" and messages[-1].text in ("yes", "no")


def test_compile_is_cached_and_thread_safe(engine):
    from concurrent.futures import ThreadPoolExecutor

    c = schema_constraint(SCHEMAS[1], None)
    with ThreadPoolExecutor(4) as pool:
        compiled = list(pool.map(lambda _: engine.prepare_constraint(c.to_dict()), range(8)))
    assert all(x.header_with_analysis is compiled[0].header_with_analysis for x in compiled)
    # the budget is per request: a different budget shares the compiled automaton
    other = engine.prepare_constraint(schema_constraint(SCHEMAS[1], 5))
    assert other.header_with_analysis is compiled[0].header_with_analysis
    assert other.constraint.max_reasoning_tokens == 5


def test_async_requests_with_a_precompiled_constraint(engine, tok, prompt):
    compiled = engine.prepare_constraint(schema_constraint(SCHEMAS[10], 0))

    async def main() -> list[int]:
        stream = engine.add_request(prompt, {"temperature": 0.0, "max_tokens": MAX_TOKENS}, constraint=compiled,
                                    eos_token_ids=tok.stop_token_ids_for_chat)
        ids = []
        async for out in stream:
            ids += out.new_token_ids
        await engine.shutdown()
        return ids

    ids = asyncio.run(main())
    jsonschema.validate(json.loads(parse_completion(ids)[-1].text), SCHEMAS[10])


@pytest.mark.parametrize("constraint, message", [
    (Constraint(ResponseFormat("json_schema", "{not json")), "response_format"),
    (Constraint(ResponseFormat("json_schema", '{"type": "strng"}')), "strng"),
    (Constraint(ResponseFormat("regex", "([a-z")), "regex"),
    (Constraint(ResponseFormat("grammar", "root ::= ")), "grammar"),
    (Constraint(tools=(ToolSpec("functions.f", '{"type": "object", "properties": {"a": {"type": "nope"}}}'),),
                tool_choice="required"), "functions.f"),
])
def test_invalid_constraints_are_refused_naming_the_problem(engine, constraint, message):
    with pytest.raises(ValueError, match=message):
        engine.prepare_constraint(constraint)


@pytest.mark.parametrize("kwargs, message", [
    ({"response_format": ResponseFormat("yaml")}, "response_format.type"),
    ({"tool_choice": "required"}, "at least one tool"),
    ({"tool_choice": "functions.x"}, "names no declared tool"),
    ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
    ({"tools": (ToolSpec("python"), ToolSpec("python"))}, "duplicate"),
])
def test_constraint_spec_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Constraint(**kwargs)


def test_constraint_round_trips_as_plain_data():
    c = Constraint(ResponseFormat("regex", "a+"), (ToolSpec("functions.f", "{}"), ToolSpec("python")),
                   "functions.f", 3)
    assert Constraint.from_dict(json.loads(json.dumps(c.to_dict()))) == c
