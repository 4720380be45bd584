"""Kernel launches that reuse the CompiledKernel of an earlier launch with the same specialization, skipping
Triton's per-call JITFunction.run (binder, cache key, option parsing, launch metadata)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from triton import knobs
from triton.knobs import HookChain
from triton.runtime.driver import driver

from sigattn.ops.configs import interpreting

# Opt-in (SIGATTN_FAST_LAUNCH=1 or set_enabled(True)) until a GPU run has checked it: written and CPU-tested in session
# 4 (bench/NOTES.md "Host path v3"), when the device budget was spent before its GPU tests could run. Off, every launch
# goes through kernel[grid](...).
_enabled = os.environ.get("SIGATTN_FAST_LAUNCH", "0") == "1"
MAX_ENTRIES = 256  # specializations kept per kernel; past that the kernel's table is cleared (a leak guard)


def enabled() -> bool:
    """Whether launches may skip JITFunction.run (never under TRITON_INTERPRET)."""
    return _enabled and not interpreting()


def set_enabled(on: bool) -> None:
    """Allow (True; default only with SIGATTN_FAST_LAUNCH=1) or forbid (False, the default) fast launches; either
    drops the tables."""
    global _enabled, _generation
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool; got {type(on).__name__}")
    _enabled = on
    _states.clear()
    _generation += 1


# Bumped whenever the tables are dropped: a Replay made before then is refused (its caller launches normally).
_generation = 0


class _KernelState:
    """Per kernel: a binder generated from the first launch's argument types, mapping launch arguments to
    (key, arguments in signature order), and the CompiledKernel per key.

    The key refines Triton's own cache key, so one key never stands for two specializations: every argument's
    type; tensors by dtype and 16-byte alignment of data_ptr (all Triton reads of a pointer); ints by value
    (whatever Triton derives: == 1, divisibility by 16, i32/i64/u64), except do_not_specialize ints, by width
    (i32/i64/u64, all Triton reads of them); floats and bools by type (never specialized); tensor descriptors by
    dtype, alignment, block shape, layout, padding, shape and strides; anything else by Triton's
    native_specialize_impl; constexprs by type and value; the launch options; plus the device, the debug flag and
    the instrumentation mode Triton adds to the options. Anything else misses and launches normally."""

    __slots__ = ("bind", "compiled", "globals_used", "kernel", "types")

    def __init__(self, kernel: Any, backend: Any, args: tuple, kwargs: dict) -> None:
        self.kernel = kernel
        self.bind, self.types = _make_binder(kernel, backend, args, kwargs)
        self.compiled: dict[tuple, Any] = {}
        self.globals_used = list(kernel.used_global_vals.items())


def _is_descriptor(x: Any) -> bool:
    return type(x).__name__ == "TensorDescriptor" and hasattr(x, "block_shape") and hasattr(x, "base")


def _make_binder(kernel: Any, backend: Any, args: tuple, kwargs: dict) -> tuple[Callable[..., tuple], tuple]:
    """Source-generated like Triton's create_function_from_signature: bind(*args, **kwargs) -> (key, ordered
    arguments); key[0] is the tuple of argument types, which must equal the returned types for an entry to be kept.
    An argument whose type changed either raises in bind (caught: normal launch) or gives a different key[0]."""
    import torch
    from triton._C.libtriton import native_specialize_impl

    sig = kernel.signature.parameters
    names = list(sig)
    params = kernel.params
    assert len(names) == len(params)
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in sig})
    bound.apply_defaults()
    values = bound.arguments
    type_parts, key_parts = [], []
    for name, kp in zip(names, params):
        x = values[name]
        if kp.is_constexpr:
            key_parts.append(f"type({name}), {name}")
            continue
        type_parts.append(f"type({name})")
        if isinstance(x, torch.Tensor):
            key_parts.append(f"{name}.dtype, {name}.data_ptr() & 15 == 0")
        elif type(x) is int and kp.do_not_specialize:
            key_parts.append(f"-0x80000000 <= {name} <= 0x7fffffff, {name} <= 0x7fffffffffffffff")
        elif type(x) is int:
            key_parts.append(name)
        elif type(x) in (float, bool) or x is None:
            key_parts.append(f"{name} is None")
        elif _is_descriptor(x):
            key_parts.append(f"{name}.base.dtype, {name}.base.data_ptr() & 15 == 0, tuple({name}.block_shape), "
                             f"getattr({name}, 'layout', None), {name}.padding, tuple({name}.shape), "
                             f"tuple({name}.strides)")
        else:
            key_parts.append(f"spec(backend, {name}, {kp.is_const}, {not kp.do_not_specialize}, "
                             f"{not kp.do_not_specialize_on_alignment})")
    defaults = {f"default_{name}": p.default for name, p in sig.items() if p.default is not p.empty}
    arg_list = ", ".join(f"{name}=default_{name}" if f"default_{name}" in defaults else name for name in names)
    src = (f"def bind({arg_list}, **options):\n"
           f"    return ((({', '.join(type_parts)},), {', '.join(key_parts)}, tuple(options.items())), "
           f"({', '.join(names)},))\n")
    namespace: dict[str, Any] = {"spec": native_specialize_impl, "backend": backend, **defaults}
    exec(src, namespace)
    bind = namespace["bind"]
    return bind, bind(*args, **kwargs)[0][0]


# By id(kernel) (a JITFunction hashes its source-derived cache_key: ~2 µs per lookup); the state holds its kernel,
# so the id is never reused while the entry lives, and the identity is checked on lookup.
_states: dict[int, _KernelState] = {}


def _hooks_clear(kernel: Any) -> bool:
    """No launch hook (Triton's launch enter/exit chains, a JITFunction pre-run hook) that a fast launch would skip."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and (type(hook) is not HookChain or hook.calls):
            return False
    return not kernel.pre_run_hooks


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """kernel[grid](*args, **kwargs); once that has compiled (or found) the kernel for this specialization, later
    calls with the same key go straight to the CompiledKernel's launcher. grid: a tuple of 1-3 ints. Returns the
    CompiledKernel when it is kept for fast launches of this key (what `Replay.record` needs), else None."""
    if not _enabled or interpreting() or type(grid) is not tuple:
        kernel[grid](*args, **kwargs)
        return None
    if not _hooks_clear(kernel):
        kernel[grid](*args, **kwargs)
        return None
    drv = driver.active
    device = drv.get_current_device()
    state = _states.get(id(kernel))
    if state is not None and state.kernel is not kernel:
        state = None
    full_key = None
    if state is not None:
        try:
            key, ordered = state.bind(*args, **kwargs)
        except (AttributeError, TypeError):  # an argument of another type than the binder's: a normal launch
            kernel[grid](*args, **kwargs)
            return None
        full_key = (device, key, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        compiled = state.compiled.get(full_key)
        if compiled is not None and (not state.globals_used or all(
                g.get(name, _MISSING) == val for (name, _), (val, g) in state.globals_used)):
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            compiled.run(grid[0], g1, g2, drv.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *ordered)
            return compiled
    compiled = kernel[grid](*args, **kwargs)
    if not _launchable(compiled):
        return None
    if state is None:
        state = _states[id(kernel)] = _KernelState(kernel, kernel.device_caches[device][3], args, kwargs)
        key, _ = state.bind(*args, **kwargs)
        full_key = (device, key, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
    if full_key[1][0] != state.types:
        return None  # another argument type than the binder's (a tensor where an int was): not kept
    if len(state.compiled) >= MAX_ENTRIES:
        state.compiled.clear()
    state.compiled[full_key] = compiled
    return compiled


class Replay:
    """One recorded fast launch, replayed with new tensors in place of the recorded ones: the launcher's own plans
    (sigattn.ops.forward / gluon_forward) skip rebuilding ~45 arguments and the binder's key (CPU, fake driver: the
    portable forward's launch_fitting + launch 18 µs -> ~2 µs).

    What the caller guarantees: its plan key fixes everything the fast-launch key reads except the per-call objects,
    and a per-call object has the recorded one's type and dtype (a descriptor: same shape, strides, block, layout and
    padding over a base of the same dtype). What a replay checks itself, per call: every per-call object's 16-byte
    alignment (which Triton specializes on) equals the recorded one's, and every condition `launch` checks (switch,
    interpreter, hooks, current device, debug knob, instrumentation mode, JIT globals, tables not dropped since)."""

    __slots__ = ("compiled", "debug", "device", "generation", "globals_used", "grid", "instrumentation", "kernel",
                 "slots", "template")

    def __init__(self, kernel: Any, compiled: Any, device: int, grid: tuple[int, int, int], template: list,
                 slots: list[tuple[list[int], bool, bool]], globals_used: list) -> None:
        self.kernel, self.compiled, self.device, self.grid = kernel, compiled, device, grid
        self.template, self.slots, self.globals_used = template, slots, globals_used
        self.debug, self.instrumentation = knobs.runtime.debug, knobs.compilation.instrumentation_mode
        self.generation = _generation

    @staticmethod
    def record(kernel: Any, compiled: Any, grid: tuple[int, ...], args: tuple, kwargs: dict,
               per_call: tuple) -> Replay | None:
        """A Replay of `launch(kernel, grid, *args, **kwargs)`, which returned `compiled`, whose call takes
        objects in place of `per_call` (tensors or descriptors among args, each found by identity); None where
        that cannot be proved: no kept CompiledKernel, or a per-call object that is also another argument."""
        state = _states.get(id(kernel))
        if compiled is None or state is None or state.kernel is not kernel or type(grid) is not tuple:
            return None
        try:
            key, ordered = state.bind(*args, **kwargs)
        except (AttributeError, TypeError):
            return None
        device = driver.active.get_current_device()
        full_key = (device, key, knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        if key[0] != state.types or state.compiled.get(full_key) is not compiled:
            return None
        template = list(ordered)
        positions = [[i for i, x in enumerate(template) if x is obj] for obj in per_call]
        if not all(positions) or sum(map(len, positions)) != len({i for p in positions for i in p}):
            return None  # a per-call object missing, or one object in two roles (q is k): not replayable
        slots = []
        for obj, where in zip(per_call, positions):
            desc = _is_descriptor(obj)
            slots.append((where, desc, (obj.base if desc else obj).data_ptr() & 15 == 0))
            for i in where:
                template[i] = None  # the recorded tensors are not kept alive by the replay
        g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        return Replay(kernel, compiled, device, g, template, slots, state.globals_used)

    def __call__(self, *objs: Any) -> bool:
        """Launch with objs in place of the recorded per-call objects; False (nothing launched) where a condition
        of the recorded launch no longer holds: the caller then launches normally."""
        if (not _enabled or self.generation != _generation or interpreting() or not _hooks_clear(self.kernel)
                or knobs.runtime.debug != self.debug
                or knobs.compilation.instrumentation_mode != self.instrumentation):
            return False
        drv = driver.active
        device = drv.get_current_device()
        if device != self.device or (self.globals_used and not all(
                g.get(name, _MISSING) == val for (name, _), (val, g) in self.globals_used)):
            return False
        args = self.template.copy()
        for obj, (where, desc, aligned) in zip(objs, self.slots):
            if ((obj.base if desc else obj).data_ptr() & 15 == 0) is not aligned:
                return False
            for i in where:
                args[i] = obj
        compiled = self.compiled
        compiled.run(*self.grid, drv.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, None, *args)
        return True


_MISSING = object()


def _launchable(compiled: Any) -> bool:
    """A finished CompiledKernel whose handles are loaded (not None from a hook, not an async-compile future)."""
    return (compiled is not None and not hasattr(compiled, "result") and getattr(compiled, "function", None) is not None
            and getattr(compiled, "_run", None) is not None)


def cached_specializations(kernel: Any) -> int:
    """How many specializations of `kernel` launch fast (tests, diagnostics)."""
    state = _states.get(id(kernel))
    return 0 if state is None or state.kernel is not kernel else len(state.compiled)
