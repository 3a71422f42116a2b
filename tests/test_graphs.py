"""sdlite.graphs.CUDAGraphs' bookkeeping on the CPU: a stand-in for the recorded graph reruns the
call on the recorded inputs into the recorded output, as a replay does. tests/test_cuda.py checks
the real graphs against plain calls on a GPU."""

import pytest
import torch

import sdlite.graphs as graphs


class ReplayedCall:
    def __init__(self, function, inputs):
        self.function, self.inputs = function, inputs

    def replay(self):
        self.output.copy_(self.function(*self.inputs))


def fake_record(function, inputs):
    recorded_inputs = [t.clone() for t in inputs]
    graph = ReplayedCall(function, recorded_inputs)
    graph.output = function(*recorded_inputs)
    fake_record.calls += 1
    return graph, recorded_inputs, graph.output


def test_one_recording_per_signature_new_inputs_each_call_and_results_that_stay(monkeypatch):
    monkeypatch.setattr(graphs, "record", fake_record)
    fake_record.calls = 0
    cached = graphs.CUDAGraphs()

    def scale(x, t):
        return x * t

    x, t = torch.arange(6.0).view(2, 3), torch.tensor(2.0)
    first = cached(scale, x, t)
    second = cached(scale, x + 1, torch.tensor(3.0))  # same signature: replayed with the new values
    assert torch.equal(second, (x + 1) * 3) and fake_record.calls == 1
    assert torch.equal(first, x * 2)  # not overwritten by the replay
    cached(scale, x.double(), t)  # another dtype, another recording
    assert fake_record.calls == 2
    for rows in (1, 3):
        cached(scale, torch.ones(rows, 3), t)
    cached(scale, x, t)  # four signatures; the first is now the most recently used
    cached(scale, torch.ones(4, 3), t)  # a fifth: the least recently used (float64) goes
    assert len(cached.graphs) == graphs.MAX_GRAPHS and fake_record.calls == 5
    assert torch.equal(cached(scale, x, t), x * 2) and fake_record.calls == 5
    cached(scale, x.double(), t)
    assert fake_record.calls == 6
    cached.clear()
    assert not cached.graphs


def test_a_failed_recording_turns_graphs_off_with_a_warning(monkeypatch):
    def refuse(function, inputs):
        refuse.calls += 1
        raise RuntimeError("operation not permitted when stream is capturing")

    refuse.calls = 0
    monkeypatch.setattr(graphs, "record", refuse)
    cached, x = graphs.CUDAGraphs(), torch.ones(2)
    with pytest.warns(UserWarning, match="CUDA graphs turned off.*not permitted"):
        assert torch.equal(cached(torch.neg, x), -x)
    assert torch.equal(cached(torch.neg, 2 * x), -2 * x) and refuse.calls == 1  # not tried again
