"""The layer-wise driver: calibrate and compress a model one block at a time.

1. Find the block list (the ``nn.ModuleList`` holding most of the weights whose every element contains a
   linear layer: ``model.layers``, ``transformer.h``, ``encoder.layer``... no per-model table).
2. Run the model on the calibration windows up to the first block and keep that block's inputs (hidden
   states on the CPU, plus the keyword arguments the model passes to its layers: masks, positions).
3. For each block: bring it onto the compute device (materialising accelerate-offloaded weights), observe
   the inputs of its linears with forward hooks, compress them (with ``true_sequential``: one group of
   linears sharing an input at a time, in the order they run, recomputing the inputs after each group),
   run the block again to get the next block's inputs, and hand the block back compressed.

Only one block's float weights are materialised at a time, so a model larger than the device (or than RAM,
with disk offload) still compresses. The compression itself is a callback, so GPTQ, SparseGPT and Wanda
share this driver.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils import logging

from ..eval._utils import accepts_kwarg
from .modules import linear_shape, set_submodule

logger = logging.get_logger(__name__)


class _StopForward(Exception):
    pass


def _is_linear(m: nn.Module) -> bool:
    """A float linear, or a compressed layer standing in for one (they all carry in/out_features)."""
    return linear_shape(m) is not None or (isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ``ModuleList`` with the most parameters whose every child has a linear layer."""
    best, best_numel = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(_is_linear(m) for m in child.modules()) for child in module):
            continue
        numel = sum(p.numel() for p in module.parameters())
        if numel > best_numel:
            best, best_numel = (name, module), numel
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of blocks containing linear layers: the layer-wise methods "
            "need a model made of repeated blocks (decoder or encoder layers)"
        )
    return best


def block_index(prefix: str, name: str) -> int:
    """The index of the block holding the module ``name``, under the block list at ``prefix`` (:func:`find_blocks`)."""
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: accelerate's execution device if dispatched, else its first parameter's device."""
    hook = getattr(model, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextmanager
def _stop_at(block: nn.Module, store: list):
    def hook(module, args, kwargs):
        store.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items()}))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to(obj, device):
    return _map_tensors(obj, lambda t: t.to(device))


def _clone(obj):
    return _map_tensors(obj, torch.clone)


TOKENS_PER_BATCH = 2048  # calibration windows run through a block together, up to this many tokens


def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor, device, batch_size: int = 1) -> list:
    """``[(hidden_states on CPU, layer kwargs)]`` per batch of ``batch_size`` calibration windows, as the first
    block receives them (the kwargs, e.g. masks, are built by the model for that batch)."""
    store: list = []
    kwargs = {"use_cache": False} if accepts_kwarg(model, "use_cache") else {}
    batches = windows.split(batch_size)
    with _stop_at(block, store), torch.no_grad():
        for batch in batches:
            ids = batch.to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            except _StopForward:
                pass
    if len(store) != len(batches):
        raise RuntimeError("the first block did not run on every calibration window")
    return [(h.to("cpu"), {k: v for k, v in kw.items() if k != "past_key_values"}) for h, kw in store]


def _offload_hooks(module: nn.Module):
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook]) if hook is not None else []
        for h in hooks:
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                yield sub, h


def materialize(block: nn.Module, device) -> None:
    """Load the block's weights onto ``device`` and drop its accelerate hooks: from here on it is ours."""
    hooks = list(_offload_hooks(block))
    if hooks or getattr(block, "_hf_hook", None) is not None:
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        for sub, h in hooks:
            names = named_module_tensors(sub, include_buffers=h.offload_buffers, recurse=h.place_submodules)
            for name, _ in list(names):
                set_module_tensor_to_device(sub, name, device, value=h.weights_map[name])
        remove_hook_from_module(block, recurse=True)
    block.to(device)


RELEASE_MIN_BYTES = 64 << 20  # below this a block's float copy is not worth a full gc.collect (~0.2 s each)
STORED_INPUTS_MAX_BYTES = 1 << 30  # StableOutputs keeps a tail linear's inputs (for every batch) up to this size


def trim_heap() -> None:
    """Return the heap's free pages to the system. glibc serves allocations below its mmap threshold (which grows
    to 32 MB as large blocks are freed) from arenas it never shrinks on its own: without this, the temporaries of
    one group's compression stay resident through the next (~30 ms)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory() -> None:
    """Free the block just compressed before the next one loads: its float layers sit in reference cycles
    (gc), and glibc keeps the freed pages unless asked to return them (:func:`trim_heap`)."""
    gc.collect()
    trim_heap()


def _observe(module, args, observer, stop: bool):
    observer.add_batch(args[0])
    if stop:
        raise _StopForward


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def linear_groups(block: nn.Module, names: list[str], sample, child_calls: list[str] | None = None) -> list[list[str]]:
    """``names`` grouped by shared input, in the order they run (q/k/v, o, gate/up, down for a Llama block).
    ``child_calls``, if given, receives the names of the block's direct children in the order they were called."""
    # The input tensors themselves are kept (not their addresses, which a freed tensor's successor may reuse).
    calls: list[tuple[str, torch.Tensor]] = []
    modules = {n: block.get_submodule(n) for n in names}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: calls.append((n, args[0]))) for n, m in modules.items()]
    if child_calls is not None:
        handles += [c.register_forward_pre_hook(lambda mod, args, n=n: child_calls.append(n)) for n, c in block.named_children()]
    try:
        with torch.no_grad():
            block(sample[0], **sample[1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen, last_input = set(), None
    for n, x in calls:
        if n in seen:
            continue
        seen.add(n)
        if groups and x is last_input:
            groups[-1].append(n)
        else:
            groups.append([n])
        last_input = x
    unused = [n for n in names if n not in seen]
    if unused:
        logger.warning("linear layers %s never ran on the calibration data and stay in float", unused)
    return groups


class StableOutputs:
    """Outputs of a block's direct children that can no longer change, kept for the block's later passes.

    With ``true_sequential`` every group of linears costs another pass over the block's inputs, each recomputing
    everything before the group. A child whose linears are all compressed, and which runs only after children
    like it, gets the same input and gives the same output in every later pass: a Llama block's ``self_attn``
    once q/k/v and o are done, so the passes for gate/up's successors and the output pass skip attention. Its
    outputs (one hidden-states tensor per batch here) are recorded in the first pass where it is stable and
    returned in the later ones instead of running it. A child that returns its last linear's output (``self_attn``
    ends in o_proj, ``mlp`` in down_proj: its *tail*) needs no run at all once that linear is compressed: the pass
    that observes the tail keeps its inputs, and the child's outputs are the compressed tail run on them
    (:meth:`derive`). Only for methods whose ``compress`` changes nothing but the linear it is given; off when a
    child runs more than once per forward (the per-batch order would not hold)."""

    def __init__(self, block: nn.Module, child_calls: list[str], linears: list[str], sample=None):
        self.block = block
        self.enabled = len(child_calls) == len(set(child_calls))
        self.order = child_calls
        self.linears = {c: [n for n in linears if n.startswith(f"{c}.")] for c in child_calls}
        self.outputs: dict[str, list] = {}
        self.tails = self._find_tails(sample, linears) if self.enabled and sample is not None else {}
        self._inputs: dict[str, list | None] = {}

    def _find_tails(self, sample, linears: list[str]) -> dict[str, tuple[str, int | None]]:
        """``{child: (its tail linear, None or the length of its output tuple)}`` for the children that return the
        output of the last linear they run, as it is (``mlp`` returns ``down_proj``'s) or first in a tuple whose other
        entries are None (``self_attn`` returns ``(o_proj's, None)`` under SDPA): one probe forward on ``sample``."""
        # Only the last linear's output is held (not every output of the probe: for a 2048-token batch through a
        # 1B-shaped block they add up to ~200 MB); a child's hook compares its output with it as the child returns.
        last: list = [None, None]
        tails: dict[str, tuple[str, int | None]] = {}

        def on_linear(module, args, out, n):
            last[0], last[1] = n, out

        def on_child(module, args, out, c):
            n, y = last
            if n is None or not n.startswith(f"{c}."):
                return
            if out is y:
                tails[c] = (n, None)
            elif isinstance(out, tuple) and out and out[0] is y and all(o is None for o in out[1:]):
                tails[c] = (n, len(out))

        handles = [self.block.get_submodule(n).register_forward_hook(partial(on_linear, n=n)) for n in linears]
        handles += [self.block.get_submodule(c).register_forward_hook(partial(on_child, c=c)) for c in self.order]
        try:
            with torch.no_grad():
                self.block(sample[0], **sample[1])
        finally:
            for h in handles:
                h.remove()
            last.clear()
        return tails

    def tail_child(self, groups_in_pass: list[list[str]]) -> str | None:
        """The child whose output is that of the pass's only linear (its tail), or None."""
        if len(groups_in_pass) != 1 or len(groups_in_pass[0]) != 1:
            return None
        return next((c for c, (n, _) in self.tails.items() if n == groups_in_pass[0][0]), None)

    @contextmanager
    def capture_tail_inputs(self, child: str):
        """Inside: the tail linear's input in every batch is kept (copied; up to ``STORED_INPUTS_MAX_BYTES`` in all),
        for :meth:`derive`. Register before the observers' hooks, which may stop the forward at the linear."""
        xs, size = [], [0]
        self._inputs[child] = xs

        def keep(module, args):
            if self._inputs.get(child) is not xs:
                return
            size[0] += args[0].numel() * args[0].element_size()
            if size[0] > STORED_INPUTS_MAX_BYTES:
                self._inputs[child] = None  # too large to keep: the child runs in the later passes
                xs.clear()
            else:
                xs.append(args[0].detach().clone())

        handle = self.block.get_submodule(self.tails[child][0]).register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def derive(self, child: str, compressed: set[str]) -> None:
        """Once the child's tail linear is compressed (its weight holds the compressed values) and the child is
        stable: its outputs are the tail linear run on the captured inputs, stored as if recorded. This saves the
        later passes running the whole child once more (attention for the gate/up pass, gate/up for the output
        pass) and gives the same bits."""
        xs = self._inputs.pop(child, None)
        if not xs or child in self.outputs or child not in self.stable(compressed):
            return
        linear, n_out = self.block.get_submodule(self.tails[child][0]), self.tails[child][1]
        with torch.no_grad():
            ys = [linear(x) for x in xs]
        self.outputs[child] = ys if n_out is None else [(y,) + (None,) * (n_out - 1) for y in ys]

    def stable(self, compressed: set[str]) -> list[str]:
        """The children, holding linears, that run before any linear not yet in ``compressed``."""
        out = []
        for c in self.order if self.enabled else []:
            if not all(n in compressed for n in self.linears[c]):
                break
            if self.linears[c]:
                out.append(c)
        return out

    @contextmanager
    def reuse(self, compressed: set[str], record: bool):
        """Inside: stable children with stored outputs return them, one per call (a pass runs the batches in order
        and reaches each stable child once per batch: they run before any linear it observes); with ``record``,
        the other stable children store theirs."""
        patched, handles, recording = [], [], {}
        for c in self.stable(compressed):
            child = self.block.get_submodule(c)
            if c in self.outputs:
                patched.append((child, child.__dict__.get("forward")))
                child.forward = partial(self._stored, iter(self.outputs[c]))
            elif record:
                recording[c] = []
                # copies, kept and handed out: the block may add to its children's outputs in place
                handles.append(child.register_forward_hook(lambda m, a, out, _outs=recording[c]: _outs.append(_clone(out))))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for child, own in patched:
                if own is None:
                    del child.forward
                else:
                    child.forward = own
        self.outputs.update(recording)

    @staticmethod
    def _stored(outs, *args, **kwargs):
        return _clone(next(outs))


def _observe_pass(block: nn.Module, inputs: list, groups: list[tuple[list[str], object]]) -> None:
    """Run ``block`` on ``inputs`` feeding each group's observer the input of its first linear."""
    # With one group, stop the block once its input is seen: the rest is not needed.
    stop = len(groups) == 1
    handles = [
        block.get_submodule(g[0]).register_forward_pre_hook(partial(_observe, observer=o, stop=stop)) for g, o in groups
    ]
    try:
        with torch.no_grad():
            for h, kw in inputs:
                try:
                    block(h, **kw)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def compress_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    make_observer: Callable[[list[nn.Module]], object],
    compress: Callable[[str, nn.Module, object], nn.Module],
    skip: list[str] | None = None,
    true_sequential: bool = True,
    device=None,
    desc: str = "compressing",
    reuse_stable: bool = False,
) -> dict[str, nn.Module]:
    """Compress every convertible linear of ``model`` block by block; returns ``{full name: new module}``.

    ``make_observer(linears)`` returns an object with ``add_batch(x)`` fed the inputs of ``linears`` (a group
    sharing one input, in execution order). After each pass over the block's inputs, an observer whose
    ``another_pass()`` returns True is fed them again. Its ``free()``, if any, runs after the group is compressed.
    ``compress(name, linear, observer)`` returns the compressed module and may change ``linear.weight`` in place
    (e.g. to its dequantized value) so the next linears and blocks see the compressed block's outputs.
    ``reuse_stable``: later passes reuse the outputs of children that can no longer change (:class:`StableOutputs`;
    the same results, fewer computations); only if ``compress`` changes nothing but the linear it is given.
    """
    device = torch.device(device) if device is not None else execution_device(model)
    prefix, blocks = find_blocks(model)
    batch_size = max(1, TOKENS_PER_BATCH // windows.shape[1])
    samples = capture_block_inputs(model, blocks[0], windows, device, batch_size)
    done: dict[str, nn.Module] = {}
    for i, block in enumerate(tqdm(blocks, desc=desc, unit="block")):
        home = next((p.device for p in block.parameters() if p.device.type != "meta"), torch.device("cpu"))
        materialize(block, device)
        block_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
        base = f"{prefix}.{i}"
        names = [
            n for n, m in block.named_modules() if linear_shape(m) is not None and should_convert_module(f"{base}.{n}", skip)
        ]
        on_device = [(_to(h, device), _to(kw, device)) for h, kw in samples]
        child_calls: list[str] = []
        groups = linear_groups(block, names, on_device[0], child_calls)
        # Linears that never change here count as compressed: skipped ones stay float throughout.
        all_linears = [n for n, m in block.named_modules() if linear_shape(m) is not None]
        compressed = {n for n in all_linears if n not in names}
        stable = StableOutputs(block, child_calls, all_linears, on_device[0]) if reuse_stable else None
        # One pass per group (true_sequential: later groups see the earlier ones compressed), or one pass for all.
        passes = [[g] for g in groups] if true_sequential else [groups]
        for groups_in_pass in passes:
            # Linears sharing an input share one observer (one Hessian for q/k/v), fed by the first of them.
            observers = [make_observer([block.get_submodule(n) for n in g]) for g in groups_in_pass]
            pending = list(zip(groups_in_pass, observers, strict=True))
            tail_of = stable.tail_child(groups_in_pass) if stable is not None else None
            while pending:  # an observer may ask for another pass over the same inputs (e.g. SmoothQuant + static)
                with stable.reuse(compressed, record=True) if stable is not None else nullcontext(), \
                        stable.capture_tail_inputs(tail_of) if tail_of is not None else nullcontext():
                    _observe_pass(block, on_device, pending)
                pending = [(g, o) for g, o in pending if getattr(o, "another_pass", lambda: False)()]
            for g, observer in zip(groups_in_pass, observers, strict=True):
                for n in g:
                    done[f"{base}.{n}"] = compress(f"{base}.{n}", block.get_submodule(n), observer)
                    compressed.add(n)
                if hasattr(observer, "free"):
                    observer.free()
                if block_bytes >= RELEASE_MIN_BYTES:
                    trim_heap()
            if tail_of is not None:
                stable.derive(tail_of, compressed)
        with torch.no_grad(), stable.reuse(compressed, record=False) if stable is not None else nullcontext():
            samples = [(_first(block(h, **kw)).to("cpu"), kw_cpu) for (h, kw), (_, kw_cpu) in zip(on_device, samples, strict=True)]
        del stable
        for n in names:
            if f"{base}.{n}" in done:
                set_submodule(block, n, done[f"{base}.{n}"])
        del on_device
        block.to(home)  # one block on the compute device at a time
        if block_bytes >= RELEASE_MIN_BYTES:
            release_memory()
    return done


def observe_layerwise(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    make_observer: Callable[[list[nn.Module]], object],
    observe: Callable[[int, str, nn.Module, object], None],
    skip: list[str] | None = None,
    device=None,
    desc: str = "observing",
) -> None:
    """One pass of the driver that changes nothing: ``observe(block index, name, linear, observer)`` for every
    convertible linear of the unchanged model, for statistics needed across blocks before any is compressed (OWL's
    outlier ratios, the spectra that rank allocation compares). One block on the compute device at a time, as above."""
    prefix, _ = find_blocks(model)

    def keep(name, linear, observer):
        observe(block_index(prefix, name), name, linear, observer)
        return linear

    compress_layerwise(model, windows, make_observer=make_observer, compress=keep, skip=skip, true_sequential=False,
                       device=device, desc=desc)
