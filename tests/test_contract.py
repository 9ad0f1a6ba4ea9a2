"""The typed contract between router and replicas (cluster/contract.py): a field one side renames or forgets fails
loudly where the message is built or read, never as a silent zero; the merge rule of deltas; the messages survive
the pickling Serve's transports apply."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from gptoss_cluster.cluster import contract as c
from gptoss_cluster.cluster.replica import ReplicaSettings
from gptoss_cluster.cluster.router.settings import RouterSettings
from gptoss_cluster.cluster.router.testing import ScriptedReplica
from gptoss_cluster.workers.constraint import Constraint, ResponseFormat
from gptoss_cluster.workers.sampling import SamplingParams


def test_unknown_or_missing_fields_fail_loudly():
    load = c.ReplicaLoad(c.ReplicaState.RUNNING, outstanding_tokens=120, num_running=2, num_waiting=1, kv_usage=0.25)
    wire = load.to_dict()
    assert wire["state"] == "RUNNING" and c.ReplicaLoad.from_dict(wire) == load
    renamed = {**{k: v for k, v in wire.items() if k != "outstanding_tokens"}, "outstanding": 120}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['outstanding'\].*missing field\(s\) "
                                         r"\['outstanding_tokens'\]"):
        c.ReplicaLoad.from_dict(renamed)
    with pytest.raises(ValueError, match="missing field"):
        c.ReplicaLoad.from_dict({})
    with pytest.raises(ValueError, match="'STOPPED' is not a valid ReplicaState"):
        c.ReplicaLoad.from_dict({**wire, "state": "STOPPED"})
    stats = ScriptedReplica(replica_id="r").stats()
    fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(c.ReplicaStats)}
    del fields["kv_blocks_free"]
    with pytest.raises(TypeError, match="kv_blocks_free"):
        c.ReplicaStats(**fields)
    with pytest.raises(TypeError, match="finish"):
        c.Delta([1], finish="stop")  # a misspelt field
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stream_intervall'\]"):
        RouterSettings.from_dict({"stream_intervall": 4})
    with pytest.raises(ValueError, match="missing field"):
        ReplicaSettings.from_dict({"dtype": "float32"})  # no model
    assert c.from_dict(RouterSettings, RouterSettings(port=7).to_dict()).port == 7


def test_delta_merge_is_reading_both_in_order():
    a = c.Delta([1, 2], [c.TokenLogprob(1, -0.5), c.TokenLogprob(2, -0.25, ((3, -1.0),))])
    b = c.Delta([3], [c.TokenLogprob(3, -2.0)], "stop", 3, c.Usage(5, 3, 0))
    merged = a.merge(b)
    assert merged.token_ids == [1, 2, 3] and [lp.token_id for lp in merged.logprobs] == [1, 2, 3]
    assert (merged.finish_reason, merged.stop_reason, merged.usage) == ("stop", 3, c.Usage(5, 3, 0))
    assert merged.finished and not a.finished
    assert a.token_ids == [1, 2] and b.token_ids == [3]  # the parts are left as they were
    assert c.Delta([1]).merge(c.Delta([2])).logprobs is None  # no logprobs asked for: none made up


def test_messages_cross_processes_pickled():
    request = c.ReplicaRequest("q1", [1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0), priority=2,
                             deadline=1767000000.5, eos_token_ids=(200002, 200012),
                             constraint=Constraint(ResponseFormat("regex", "[a-z]+")), prefix_hashes=(b"\x01" * 16,),
                             exclude_replicas=("r9",), channel=c.ChannelRoute("router-1", 7),
                             trace_context={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    events = [request, c.Accepted("r1"), c.Delta([4], [c.TokenLogprob(4, -0.1)], "length", None, c.Usage(3, 1, 0)),
              c.ReplicaError(c.ErrorCode.DEADLINE_EXCEEDED, "late"), c.ChannelOpen("router-1", "r1"), c.Misrouted("r2"),
              ScriptedReplica(replica_id="r1").stats(), ScriptedReplica().model_info()]
    for message in events:
        assert pickle.loads(pickle.dumps(message)) == message
    assert request.cost == 3 + 8
