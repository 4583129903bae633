"""Functional models: layers called on graph values, and `Model`, which trains what they build.

Called on a value of a graph, a layer builds its forward pass in that graph
(`h = gd.Linear(4, 16)(x)`), beside graphdl's functional ops (`h + gd.tanh(...)`), as in
Keras' functional API: a network need not be a chain. It may have several inputs, skip
connections, a layer called twice. `gd.Model(inputs, output)` trains such a graph with
the fit, predict, evaluate, summary, callbacks, checkpoints and model files a
`gd.Sequential` has: they are Sequential's own methods, which ask a model only for what
this one provides (`graph`, `places`, `parameters`, `binding`, `compiled`, ...).

The layers of a graph. The layers called on one graph are numbered by their first call,
k = 0, 1, ...: layer k builds in the scope "k:Type" and its params are "k.weight", ...,
as in a Sequential. Called again, a layer reads the same params (one param, whose
gradients add up); a layer holding a tensor that the graph already has as a param (a
tie, `l2.weight = l1.weight`, or a tensor given to `graph.param`) reads that param.
Which layer is which, and each call (the layer, the value it was called on, the value
it gave), is recorded here, per graph (`_CALLS`), not in the IR.

Modes. A call builds the layer's forward in inference mode, the graph `predict` runs
(Dropout passes its input through, BatchNorm reads its running statistics). Each call
gives a value of its own, the output of a node it built: one whose forward gives back
a value it did not build (Dropout's inference forward gives its input) gives it as
`value * 1`, so that what reads the call's output is told from what reads its input.
A model rebuilds each call in the mode asked for (`graph(training=True)` is the graph
fit trains: Dropout draws its mask, BatchNorm normalises by the batch and gives its
running statistics' next values, labelled "next/NAME", as a Sequential's do).

A model keeps its own copy of what its output needs (its template): the inputs, the
nodes and layer calls that lead to the output and the params they read, its layers
renumbered in order of first call (a layer the output does not use is not the model's).
`graph()` builds a fresh graph from it each time: the nodes copied, each call built
again by its layer in the mode asked for, the loss appended. Several inputs are fed as
one tensor, their features side by side, because fit's epochs walk one X: the
template's first nodes slice them apart, each in the scope "input:NAME". So they must be
rows [N, features] of one dtype, and fit, predict and evaluate take a tuple, one tensor
per input, joined once per call (a copy of the data).

Ties made after building. The template fixes which param each place reads. When two of
its params come to hold one tensor later (`l2.weight = l1.weight` after the model was
built), `graph()` makes them one param, as a Sequential does; a place that read another's
param and is given a tensor of its own cannot be rebuilt from the template, and is
refused.
"""

from __future__ import annotations

from .calls import call
from .model import Model, load

__all__ = ["Model", "call", "load"]
