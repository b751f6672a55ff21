"""`gate(xs)`: the identity, as an instruction XLA keeps: whatever consumes its results runs
after all of its operands exist.

Why (measured with jax_ddl.trace, docs/training.md): XLA's CPU executor orders two
instructions whenever their buffers overlap, and its buffer assignment reuses a buffer's
memory once the buffer's last reader, in XLA's sequential schedule, has run. A jax_ddl call
that completes asynchronously is a single instruction in that schedule. If its result is
read early (a gradient bucket's sum read by the optimizer's update of those parameters,
scheduled right after the call to free memory), the result's memory goes to the next
backward-pass instruction, which then waits for the pending call: each bucket's reduction
held up the backward pass. Passing every bucket's sum through one gate keeps every result
unread, and its memory unreused, until all of them exist, after the backward pass.

`jax.lax.optimization_barrier` does not do this on CPU: XLA expands it before scheduling.
On other platforms the gate lowers to nothing (their executors order work by stream).
"""

from __future__ import annotations

import jax

from jax_ddl import _ddl
from jax_ddl._src import compat

TARGET = "jax_ddl_gate"
jax.ffi.register_ffi_target(TARGET, _ddl.gate_cpu(), platform="cpu")

gate_p = compat.Primitive("ddl_gate")
gate_p.multiple_results = True
# Operands: the `n` values passed through, then values only waited for (read, never
# written, so that they do not order anything else that reads them after the gate).
gate_p.def_abstract_eval(lambda *avals, n: list(avals[:n]))
gate_p.def_impl(lambda *xs, n: list(xs[:n]))


def _lower_cpu(ctx, *xs, n):
    rule = jax.ffi.ffi_lowering(
        TARGET, operand_output_aliases={i: i for i in range(n)}, has_side_effect=True
    )
    return rule(ctx, *xs)


compat.mlir.register_lowering(gate_p, lambda ctx, *xs, n: list(xs[:n]))
compat.mlir.register_lowering(gate_p, _lower_cpu, platform="cpu")


def _jvp(primals, tangents, n):
    # The identity on its first n operands: tangents pass as they are (symbolic zeros too).
    return gate_p.bind(*primals, n=n), list(tangents[:n])


def _transpose(cts, *xs, n):
    # Linear in its first n operands (the identity): cotangents pass as they came; the
    # operands only waited for get a zero where JAX asks for one.
    out = [ct if compat.is_undefined_primal(x) else None for ct, x in zip(cts, xs[:n])]
    rest = [compat.Zero(x.aval) if compat.is_undefined_primal(x) else None for x in xs[n:]]
    return out + rest


compat.ad.primitive_jvps[gate_p] = _jvp
compat.ad.primitive_transposes[gate_p] = _transpose
compat.batching.primitive_batchers[gate_p] = lambda args, dims, n: (
    gate_p.bind(*args, n=n),
    list(dims[:n]),
)


def gate(xs: tuple, after: tuple = ()) -> tuple:
    """`xs` unchanged; every consumer of the results runs after every element of `xs`,
    and of `after`, exists (see the module docstring). `after` is only waited for."""
    if not xs:
        return ()
    return tuple(gate_p.bind(*xs, *after, n=len(xs)))
