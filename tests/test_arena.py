"""The arena form of compiled code (graphdl.compile.lower(..., arena=True)) and its
buffer plan (graphdl.passes.memory.plan_arena): what fit's training step runs.

Arena code must compute exactly what the plain code computes, call after call with the
same buffers, for any graph; its plan must never give a buffer to two values alive at
once; and what it hands back through `ArenaCompiled.__call__` must own its memory.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import fuzz, programs, random_graph

import graphdl as gd
from graphdl.compile import lower
from graphdl.passes.memory import last_uses, plan_arena, plan_inplace


def disk_step(act: type[gd.Layer] = gd.Tanh, loss: gd.Loss | None = None) -> gd.Compiled:
    torch.manual_seed(0)
    model = gd.Sequential(gd.Linear(2, 25), act(), gd.Linear(25, 25), act(), gd.Linear(25, 25), act(),
                          gd.Linear(25, 1))
    return gd.compile(gd.grad(model.graph(loss or gd.MSE()), list(model.parameters())))


def _random_step(program, seed: int, batch: int) -> gd.Compiled:
    return gd.compile(gd.grad(random_graph(program, seed, batch)[0], ["x", "y", "c", "b", "W", "V"]))


@pytest.mark.slow
@fuzz(80)
@given(programs(), st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_arena_code_matches_plain_code_call_after_call(program, seed, batch):
    plain = _random_step(program, seed, batch)
    arena = lower(plain.graph, arena=True)
    sizes = {"N": batch}
    bindings = arena.bind(sizes)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):  # the same buffers each time: nothing may leak from one call into the next
        x = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(batch, 1, generator=gen, dtype=torch.float64)
        want = plain(x=x, y=y)
        got = arena.fn(x, y, bindings)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@fuzz(80)
@given(programs(), st.integers(1, 5))
def test_arena_plan_never_shares_a_buffer_between_live_values(program, batch):
    graph = _random_step(program, 0, batch).graph
    hoisted: set[int] = set()
    for node in graph.nodes:
        if all(id(v) in hoisted for v in node.inputs):
            hoisted.add(id(node.out))
    last = last_uses(graph)
    inplace = plan_inplace(graph, hoisted, last)
    writes, lives_in, buffers = plan_arena(graph, hoisted, inplace, last)
    end = len(graph.nodes)
    returned = {id(v) for v in graph.outputs}
    spans: dict[int, list[tuple[int, int]]] = {}  # buffer -> [first write, last read] of each value written there
    for k, node in enumerate(graph.nodes):
        if k in writes:
            v = node.out
            assert (v.shape, v.dtype) == (buffers[writes[k]].shape, buffers[writes[k]].dtype)
            # a value, and the in-place chain continuing it, occupies the buffer until its last read
            chain, stop = v, last.get(id(v), k)
            while True:
                nxt = [u for u in chain.users if id(u.out) in lives_in and lives_in[id(u.out)] == writes[k]
                       and graph.nodes.index(u) in inplace]
                if not nxt:
                    break
                chain = nxt[0].out
                stop = max(stop, last.get(id(chain), graph.nodes.index(nxt[0])))
            if id(chain) in returned or any(not u.op.memory.new_storage for u in chain.users):
                stop = end
            spans.setdefault(writes[k], []).append((k, stop))
    for b, ranges in spans.items():
        ranges.sort()
        for (_, stop), (start, _) in zip(ranges, ranges[1:]):
            assert stop < start, f"buffer {b}: a value written at node {start} while another is read until {stop}"


def test_disk_step_reuses_buffers_and_prepares_transposes():
    plain = disk_step()
    arena = lower(plain.graph, arena=True)
    writes = arena.layout.writes
    assert len(arena.layout.buffers) < len(writes)  # buffers are reused as values die
    # The weights' and the activations' transposes are prepared views; only the batch's
    # own (x, new at every call) is made in the code.
    assert arena.source.count(".mT") == 1 and "i0_x.mT" in arena.source
    assert "out=" in arena.source and "P0.tensor" not in arena.source
    # every gradient lands in a buffer, so fit can plan its update on them
    assert all(b is not None for b in arena.layout.output_buffers[1:])


def test_arena_call_returns_outputs_of_their_own():
    arena = lower(disk_step().graph, arena=True)
    x, y = torch.rand(5, 2), torch.rand(5, 1)
    first = arena(x=x, y=y)
    kept = [t.clone() for t in first]
    arena(x=torch.rand(5, 2), y=torch.rand(5, 1))  # same batch size: the same buffers again
    for a, b in zip(first, kept, strict=True):
        assert torch.equal(a, b)


def test_arena_reads_a_param_assigned_after_binding_only_once_bound_again():
    plain = disk_step()
    arena = lower(plain.graph, arena=True)
    x, y = torch.rand(5, 2), torch.rand(5, 1)
    weight = plain.graph.params["2.weight"]
    weight.data = torch.randn(25, 25).mT.contiguous().mT  # a new tensor, and a transposed layout
    for got, want in zip(arena(x=x, y=y), plain(x=x, y=y), strict=True):
        torch.testing.assert_close(got, want)


def test_in_place_updates_reach_prepared_transposes():
    """A prepared transpose is a view: the optimizer's in-place updates need no re-binding."""
    plain = disk_step()
    arena = lower(plain.graph, arena=True)
    bindings = arena.bind({"N": 5})
    x, y = torch.rand(5, 2), torch.rand(5, 1)
    with torch.no_grad():
        for v in plain.graph.params.values():
            v.data.mul_(1.5)
    for got, want in zip(arena.fn(x, y, bindings), plain(x=x, y=y), strict=True):
        torch.testing.assert_close(got, want)


def test_other_activations_and_losses_run_in_the_arena():
    for act, loss in ((gd.ReLU, gd.MSE()), (gd.Sigmoid, gd.MAE()), (gd.Tanh, gd.MBE())):
        plain = disk_step(act, loss)
        arena = lower(plain.graph, arena=True)
        bindings = arena.bind({"N": 7})
        for _ in range(2):
            x, y = torch.rand(7, 2), torch.rand(7, 1)
            for got, want in zip(arena.fn(x, y, bindings), plain(x=x, y=y), strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_buffers_that_cannot_be_allocated_are_named_not_a_bare_allocator_error():
    """[1e6, 1e7] float32 buffers need 160 TB, more than any address space holds."""
    model = gd.Sequential(gd.Linear(1, 10**7), gd.Tanh(), gd.Linear(10**7, 1))
    X = torch.zeros(10**6, 1)
    with pytest.raises(gd.GraphError, match=r"its buffers for \{'N': 1000000\} need .* MiB, which cpu cannot "
                                            r"allocate .*use a smaller batch_size"):
        model.fit(X, X, batch_size=len(X), epochs=1, verbose=False)
