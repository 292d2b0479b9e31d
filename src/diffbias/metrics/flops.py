"""FLOP (multiply-accumulate) and parameter counting with fvcore, plus handles for what fvcore misses.

Convention (``docs/model-contract.md``, README "Parameter and FLOP counts"): FLOPs are multiply-accumulates
per image as fvcore counts them, the convention of the DiT paper's "Gflops". fvcore prices matmuls, linears,
convolutions, einsums and norms; it does not price element-wise maps (add, mul, activations,
softmax), which is also the DiT paper's convention. What fvcore cannot see gets a handle here:

- ``aten::scaled_dot_product_attention`` (fused attention): QK^T and AV priced as the two explicit
  matmuls fvcore would count, ``B*h*Lq*Lk*(d + dv)`` (= ``2*B*h*Lq*Lk*d``); the softmax, scale and
  any mask are element-wise and not counted.
- ``diffbias::neighborhood_attention`` (2-D local attention, run as one opaque operator while
  :func:`diffbias.models.attention.flop_counting` is active): each query sees exactly its k x k keys,
  ``B*h*L*k^2*(d + dv)``.

A backbone declares what its own custom operators cost in a class attribute ``flop_handles`` ({op name:
handle}, written with torch and math only: models never import metrics), e.g. ``DICE.flop_handles``
prices ``diffbias::dice_signal``, ``UViT.flop_handles`` ``diffbias::gmm_attention`` and
``DiffuSSM.flop_handles`` the FFTs. :func:`flop_handles` collects them from every registered backbone
when counting (one place per fact: the module that defines an operator also says what it costs).
Operators no backbone owns (the two above, a plugin's) go in :data:`EXTRA_HANDLES` through
:func:`register_flop_handle`.

Counting conventions (:data:`CONVENTIONS`). Published counts were made with different tools; to reproduce
each printed number, a preset's published counts name their convention and are compared with our count
under that convention (``model_summary(...)["published"]``, ``scripts/preset_counts.py``):

- ``diffbias`` (default): the above, every handle on; the DiT paper's "Gflops" (its table 4).
- ``fvcore-as-shipped``: fvcore with none of the handles above, so fused attention (QK^T and AV inside
  ``scaled_dot_product_attention``), local/GMM attention, FFTs and the DICE signal function cost 0, as
  when fvcore meets them without a handle. Paper 002 table 2 "GFlops": DiT-XL/2 114.46 = 118.69 minus
  the 28 x 2 x 256^2 x 1152 = 4.23 G attention matmuls; DICE-XL 47.49 without the signal function.
- ``torchinfo-mult-adds``: torchinfo's "Total mult-adds" (torchinfo 1.8 ``LayerInfo.calculate_macs``,
  summed over leaf modules): a convolution costs its weight + bias numel x output positions, any other
  leaf module its weight + bias numel once per image (a Linear applied to 256 tokens counts once).
  Paper 002 table 2 "Mult-Adds": DiT-XL/2 0.68 G (its parameters plus the patch conv x 256), DICE-XL 1.05 G.

Counting does no arithmetic: fvcore's trace (and the torchinfo pass) run on the meta device, where a tensor
is a shape, a dtype and strides without storage (:func:`count_flops`), so a DiffuSSM-XL costs what a tiny
model does. The counts are those of a trace on real tensors (tested for every backbone).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import warnings
from collections import Counter
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

# op name as it appears in a TorchScript trace (e.g. "diffbias::neighborhood_attention") -> fvcore handle
# handle(inputs: list[torch._C.Value], outputs: list[torch._C.Value]) -> number of MACs (int or Counter)
# Here only operators that no backbone owns; a backbone's own operators are in its class's flop_handles.
EXTRA_HANDLES: dict[str, Callable[[list[Any], list[Any]], Any]] = {}


def register_flop_handle(op_name: str, handle: Callable[[list[Any], list[Any]], Any]) -> None:
    """Price an operator that no backbone owns (a backbone declares its own in ``flop_handles``)."""
    EXTRA_HANDLES[op_name] = handle


def flop_handles() -> dict[str, Callable[[list[Any], list[Any]], Any]]:
    """Every handle of the ``diffbias`` convention: :data:`EXTRA_HANDLES` plus the ``flop_handles`` that each
    registered backbone declares. Two different handles for one operator raise (a count must not depend on
    which backbone happens to be registered last)."""
    from diffbias.models import BACKBONES  # importing the package registers every backbone

    handles = dict(EXTRA_HANDLES)
    declared_by = {op: "diffbias.metrics.flops" for op in handles}
    for name, cls in sorted(BACKBONES.items()):
        for op, handle in dict(getattr(cls, "flop_handles", None) or {}).items():
            if op in handles and handles[op] is not handle:
                raise ValueError(f"two FLOP handles for {op!r}: {declared_by[op]} and backbone {name!r}")
            handles[op] = handle
            declared_by.setdefault(op, f"backbone {name!r}")
    return handles


CONVENTIONS: dict[str, str] = {
    "diffbias": "fvcore MACs with this project's handles (attention matmuls, local/GMM attention, FFTs, "
                "DICE signal function priced); the DiT paper's convention",
    "fvcore-as-shipped": "fvcore MACs without this project's handles: fused attention matmuls and custom "
                         "element-wise operators cost 0 (paper 002 table 2 'GFlops')",
    "torchinfo-mult-adds": "torchinfo 'Total mult-adds': conv params x output positions, other leaf layers' "
                           "params once per image (paper 002 table 2 'Mult-Adds')",
}
DEFAULT_CONVENTION = "diffbias"


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown counting convention {convention!r}; known: {sorted(CONVENTIONS)}")


# ----------------------------------------------------------------------------------------------------
# Handles
# ----------------------------------------------------------------------------------------------------


def _sizes(value: Any) -> list[int]:
    sizes = value.type().sizes()
    if sizes is None:
        raise ValueError(f"FLOP handle needs a complete tensor shape, got {value.type()}")
    return list(sizes)


def _constant(value: Any) -> Any:
    return value.toIValue()


def sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::scaled_dot_product_attention(q, k, v, ...): QK^T and AV as explicit matmuls.

    q: (..., Lq, d), k: (..., Lk, d), v: (..., Lk, dv) -> prod(batch dims) * Lq * Lk * (d + dv) MACs,
    exactly what fvcore counts for ``(q @ k.transpose(-1, -2)).softmax(-1) @ v``.
    """
    q, k, v = (_sizes(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def neighborhood_attention_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """diffbias::neighborhood_attention(q, k, v, height, width, kernel_size): each of the L queries
    attends exactly kernel_size^2 keys (NATTEN semantics) -> B*h*L*k^2*(d + dv) MACs."""
    q, _, v = (_sizes(x) for x in inputs[:3])
    kernel_size = int(_constant(inputs[5]))
    batch = math.prod(q[:-2])
    return batch * q[-2] * kernel_size * kernel_size * (q[-1] + v[-1])


register_flop_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
register_flop_handle("diffbias::neighborhood_attention", neighborhood_attention_flop_handle)

# Operators fvcore leaves uncounted that are element-wise, reductions, lookups or cheap data movement:
# by convention (the DiT paper's) they cost nothing. Any other uncounted operator may hide real work
# (an FFT, a custom kernel without a handle) and raises a warning from count_flops.
ELEMENTWISE_OPS: frozenset[str] = frozenset(
    f"aten::{name}"
    for name in """
    add add_ sub sub_ rsub mul mul_ div div_ neg abs pow sqrt rsqrt exp exp_ log log_ log1p expm1 reciprocal square
    sin cos tan tanh sigmoid silu silu_ gelu relu relu_ leaky_relu elu softplus hardtanh hardswish mish
    softmax log_softmax _softmax erf erfinv sign minimum maximum clamp_min clamp_max where lerp addcmul addcdiv
    mean sum prod var std var_mean amax amin argmax argmin cumsum norm linalg_vector_norm logsumexp
    embedding one_hot masked_fill_ fill_ zero_ zeros zeros_like ones ones_like rand randn rand_like randn_like
    lt le ne logical_and logical_or logical_not bitwise_and bitwise_or remainder fmod round trunc ceil
    repeat repeat_interleave tile roll flip pad reflection_pad2d replication_pad2d to type_as clone
    stack split split_with_sizes unbind unflatten movedim swapaxes masked_select index_select scatter scatter_add
    tril triu diag diagonal eye linspace meshgrid triu_indices tril_indices
    pixel_shuffle pixel_unshuffle channel_shuffle view_as_real view_as_complex real imag complex polar conj angle
    upsample_nearest1d upsample_nearest3d avg_pool2d max_pool2d dropout_ feature_dropout alpha_dropout
    """.split()
)


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters; a parameter shared by several modules counts once, buffers (the fixed
    positional embedding, PCA bases, masks) never count. Works on meta-device models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# Building a model cheaply for counting
# ----------------------------------------------------------------------------------------------------


def materialize_on_cpu(model: nn.Module) -> nn.Module:
    """Give every meta-device parameter and buffer CPU storage of the same shape and dtype, in place.

    The fallback when a model cannot be traced on the meta device (:func:`count_flops`): that trace
    needs real tensors but not real values, and a model built on the meta device skips its (slow)
    initialisation. Floating tensors are left
    uninitialised (no memory is touched until used); integer and boolean tensors (indices, masks)
    are zeros so that lookups stay in range. Shared tensors stay shared; tensors that are already
    real (e.g. buffers made with numpy) keep their values. The result is for counting only.
    """
    memo: dict[int, torch.Tensor] = {}

    def real(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            make = torch.empty if t.is_floating_point() or t.is_complex() else torch.zeros
            memo[id(t)] = make(t.shape, dtype=t.dtype)
        return memo[id(t)]

    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(real(p), requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = real(b)
    return model


def build_for_counting(
    backbone: str | None = None,
    preset: str | None = None,
    options: dict | None = None,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int = 0,
    learn_sigma: bool = True,
    materialize: bool = True,
) -> nn.Module:
    """``build_model`` on the meta device (fast for big presets: no weights, no initialisation).

    ``materialize=True`` then gives it uninitialised CPU storage (:func:`materialize_on_cpu`);
    ``materialize=False`` returns the meta model as it is, which :func:`count_flops`,
    :func:`count_mult_adds` and :func:`count_parameters` count without touching any memory (buffers
    made with numpy stay real). Falls back to an ordinary CPU build if the backbone cannot be
    constructed on the meta device.
    """
    from diffbias.models import build_model

    kwargs = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma)
    try:
        with torch.device("meta"):
            model = build_model(backbone, preset, options, **kwargs)
    except Exception:  # noqa: BLE001 - any construction problem on meta: build normally
        return build_model(backbone, preset, options, **kwargs)
    return materialize_on_cpu(model) if materialize else model


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


@contextlib.contextmanager
def _on_meta(model: nn.Module) -> Iterator[nn.Module]:
    """Swap every parameter and buffer of ``model`` for a meta tensor of the same shape, dtype and strides
    for the duration of the block, then put the originals back (in place: no copy of the weights is made,
    and a real model comes back untouched). Shared tensors stay shared."""
    memo: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict, str, torch.Tensor]] = []

    def meta(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            m = t if t.is_meta else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
        return memo[id(t)]

    try:
        for module in model.modules():
            for slots in (module._parameters, module._buffers):
                for name, t in list(slots.items()):
                    if t is not None and not t.is_meta:
                        saved.append((slots, name, t))
                        slots[name] = meta(t)
        yield model
    finally:
        for slots, name, t in reversed(saved):
            slots[name] = t


# ----------------------------------------------------------------------------------------------------
# Shape-only execution: the trace needs every operator's output shape, not its values
# ----------------------------------------------------------------------------------------------------

# Compute-heavy ATen kernels (reached below the jit tracer, after composite ops such as linear, matmul,
# einsum and scaled_dot_product_attention have been recorded and decomposed). Custom operators of other
# namespaces (diffbias::...) are treated as heavy too; each must have a fake (meta) implementation.
HEAVY_ATEN_OPS: frozenset[str] = frozenset(
    """mm addmm bmm baddbmm addbmm _convolution mkldnn_convolution convolution_overrideable
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_flash_attention
    _scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention _scaled_dot_product_attention_math
    _fft_r2c _fft_c2r _fft_c2c native_layer_norm native_group_norm""".split()
)

_META_WORKER = None


def _meta_worker():
    # Output shapes are computed on meta tensors in a worker thread: the tracing state is thread-local,
    # and inside a trace the (Python) meta kernels would see traced sizes.
    global _META_WORKER
    if _META_WORKER is None:
        from concurrent.futures import ThreadPoolExecutor

        _META_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffbias-flops-meta")
    return _META_WORKER


def _shape_only_call(func, args, kwargs):
    """Run ``func`` on meta stand-ins of its tensor arguments; return uninitialised tensors of the
    output shapes on the arguments' device. Runs in the worker thread (no tracing state there)."""
    from torch.utils._pytree import tree_flatten, tree_map

    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")

    def to_meta(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        return a

    def to_real(o):
        if isinstance(o, torch.Tensor):
            return torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=device)
        return o

    with torch.no_grad():
        out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))
        return tree_map(to_real, out)


def _tracer_key():
    try:
        key = torch._C._parse_dispatch_key("Tracer")
        torch._C._dispatch_tls_is_dispatch_key_excluded(key)
        return key
    except Exception:  # noqa: BLE001 - private API missing: no shape-only mode
        return None


def _shape_only_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    tracer = _tracer_key()
    if tracer is None:
        raise RuntimeError("this torch build exposes no Tracer dispatch key; trace for real")
    aten = torch.ops.aten

    class ShapeOnlyHeavyOps(TorchDispatchMode):
        """Runs every operator normally except the compute-heavy ones, which return uninitialised
        tensors of the right shape, dtype and strides (found on the meta device). A jit trace taken
        under this mode records the same graph with the same shapes, at a fraction of the cost."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten.convolution.default and not kwargs:
                return self._convolution(args)
            namespace, _, op = func._schema.name.partition("::")
            heavy = (namespace == "aten" and op in HEAVY_ATEN_OPS) or namespace not in ("aten", "prim")
            if not heavy or any(r.alias_info is not None for r in func._schema.returns):
                return func(*args, **kwargs)
            # Nothing here may parse an int list in this thread: under a trace the Python argument
            # parser would stash traced sizes that the next traced operator then mistakes for its own.
            try:
                return _meta_worker().submit(_shape_only_call, func, args, kwargs).result()
            except Exception:  # noqa: BLE001 - no meta kernel: compute it for real
                return func(*args, **kwargs)

        def _convolution(self, args):
            # The tracer does not record aten::convolution itself but the aten::_convolution that its
            # kernel dispatches (what fvcore prices). Inside this handler tracing is switched off, so
            # dispatch that inner call here with the tracer on (and this mode on, to skip the work).
            cudnn = torch.backends.cudnn
            flags = (bool(cudnn.benchmark), bool(cudnn.deterministic), bool(cudnn.enabled), bool(cudnn.allow_tf32))
            excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(tracer)
            torch._C._dispatch_tls_set_dispatch_key_excluded(tracer, False)
            try:
                with self:
                    return aten._convolution.default(*args, *flags)
            finally:
                torch._C._dispatch_tls_set_dispatch_key_excluded(tracer, excluded)

    return ShapeOnlyHeavyOps


def _metadata_key(value: Any) -> Any:
    """A hashable stand-in for an operator argument: a meta tensor by its metadata (all a meta kernel
    reads), containers element-wise, anything else as itself; TypeError for what cannot be a key (a
    real tensor: its values may matter)."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            raise TypeError("a real tensor is not metadata alone")
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype,
                value.device, value.is_conj(), value.is_neg())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_metadata_key, value))
    if isinstance(value, dict):
        return ("dict", *((k, _metadata_key(v)) for k, v in sorted(value.items())))
    hash(value)
    return value


def _all_meta(value: Any) -> bool:
    """Whether ``value`` is a meta tensor, or a list/tuple of meta tensors (and Nones)."""
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if isinstance(value, (list, tuple)):
        return bool(value) and all(v is None or _all_meta(v) for v in value)
    return False


def _fresh_like(value: Any) -> Any:
    """New meta tensors with the metadata of ``value``'s tensors (the other leaves as they are)."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(map(_fresh_like, value))
    return value


def _meta_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    tracer = _tracer_key()
    if tracer is None:
        raise RuntimeError("this torch build exposes no Tracer dispatch key; trace on real tensors")
    aten = torch.ops.aten

    class MetaTrace(TorchDispatchMode):
        """Runs every operator on the meta device (inputs, weights and outputs are meta tensors: shapes,
        dtypes and strides, no storage), so a jit trace records the graph of a normal trace with its
        shapes and does no arithmetic at all. Kernels run in the worker thread: many meta kernels are
        Python, and in the trace's thread ``tensor.shape`` gives traced sizes that the argument parser
        stashes for the next traced operator (see ShapeOnlyHeavyOps).

        Meta kernels are slow (0.1-1 ms for a pointwise op) and a deep model calls the same ones on the
        same shapes in every block: a functional operator's output metadata is a function of its
        arguments' metadata, so it is computed once per distinct call and then handed out as fresh
        tensors. Views and in-place operators (their outputs alias their inputs) always run."""

        def __init__(self):
            super().__init__()
            self.outputs: dict[Any, Any] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is aten.convolution.default and not kwargs:
                # As in ShapeOnlyHeavyOps: the trace must record the aten::_convolution that the CPU
                # kernel dispatches (what fvcore prices); convolution's meta kernel would dispatch nothing.
                cudnn = torch.backends.cudnn
                flags = (bool(cudnn.benchmark), bool(cudnn.deterministic), bool(cudnn.enabled),
                         bool(cudnn.allow_tf32))
                excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(tracer)
                torch._C._dispatch_tls_set_dispatch_key_excluded(tracer, False)
                try:
                    with self:
                        return aten._convolution.default(*args, *flags)
                finally:
                    torch._C._dispatch_tls_set_dispatch_key_excluded(tracer, excluded)
            return _meta_worker().submit(self._run, func, args, kwargs).result()

        def _run(self, func, args, kwargs):
            """In the worker thread (no tracing state there), below autograd and ADInplaceOrView as a kernel
            called from a handler in the tracing thread would be: that thread gives views their autograd
            metadata itself."""
            with torch._C._AutoDispatchBelowADInplaceOrView():
                schema = func._schema
                if any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)):
                    return func(*args, **kwargs)
                try:
                    key = (func, _metadata_key(args), _metadata_key(kwargs))
                except TypeError:  # an argument that cannot be a key: run the kernel every time
                    return func(*args, **kwargs)
                if key in self.outputs:
                    return _fresh_like(self.outputs[key])
                out = func(*args, **kwargs)
                # Only meta tensors are metadata alone: a real tensor (e.g. the tracer's own 0-dim size
                # tensors, made on the CPU) or a number (their values, read by item()) is a value.
                if _all_meta(out):
                    self.outputs[key] = _fresh_like(out)
                return out

    return MetaTrace


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------


def _flop_count_analysis_class():
    # fvcore's package import runs torch.jit.script (deprecated in recent torch): keep that quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _per_image(value: float, batch_size: int) -> int:
    return int(round(value / batch_size))


def _counting_inputs(model: nn.Module, caller: str, input_size: int, in_channels: int, num_classes: int,
                     batch_size: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """(x, t[, y]) for one counting pass, on ``device`` (default: the model's; a meta-device model is
    only counted through the meta paths, which pass ``device="meta"``)."""
    if device is None:
        device = _model_device(model)
        if device.type == "meta":
            raise ValueError(f"{caller} needs real tensors: materialise the model first (materialize_on_cpu)")
    x = torch.randn(batch_size, in_channels, input_size, input_size, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    if num_classes > 0:
        return x, t, torch.randint(0, num_classes, (batch_size,), device=device)
    return x, t


def count_flops(
    model: nn.Module,
    *,
    input_size: int,
    in_channels: int,
    num_classes: int = 0,
    batch_size: int = 1,
    shape_only: bool = True,
    convention: str = DEFAULT_CONVENTION,
) -> tuple[int, "pandas.DataFrame"]:  # noqa: F821
    """Multiply-accumulates per image, as fvcore counts them, plus a per-operator breakdown.

    ``convention`` (see :data:`CONVENTIONS`): ``diffbias`` (default) prices every operator in
    :func:`flop_handles`; ``fvcore-as-shipped`` prices none of them (they are then skipped, silently);
    ``torchinfo-mult-adds`` is not an fvcore count (use :func:`count_mult_adds`).

    The model is traced on ``batch_size`` random inputs (x, t[, y]) in eval mode under
    :func:`diffbias.models.attention.flop_counting`, with the handles of :func:`flop_handles`.

    Returns ``(macs, df)``: ``df`` has columns ``[operator, macs, share]`` (per image, largest
    first) and ``df.attrs`` holds ``skipped_ops`` (operators fvcore saw but did not price, with
    their call counts), ``unrecognised_ops`` (the skipped ones that are not known element-wise
    maps; a warning names them), ``by_module_type`` (MACs per image per module class, each op
    attributed to the innermost module that ran it), ``batch_size``, ``shape_only`` and
    ``counted_on`` (below).

    ``shape_only`` (default) does no arithmetic: the trace runs on the meta device (``MetaTrace``;
    the model's parameters and buffers are swapped for meta tensors during the trace and put back
    after), so it costs the same for DiT-XL/2 as for a tiny model. Where that fails (an operator
    without a meta kernel, a value read out of a tensor), it runs on CPU tensors with only the heavy
    kernels skipped (``ShapeOnlyHeavyOps``), and if that fails too, normally. Every way records the
    same graph with the same shapes, hence the same counts (tested for every backbone);
    ``df.attrs["counted_on"]`` is ``"meta"``, ``"shape-only"`` or ``"real"``. ``shape_only=False``
    traces on real tensors. A model built on the meta device (``build_for_counting(...,
    materialize=False)``) that has to be traced on CPU tensors is materialised in place first
    (:func:`materialize_on_cpu`).
    """
    import pandas as pd

    from diffbias.models.attention import flop_counting

    _check_convention(convention)
    if convention == "torchinfo-mult-adds":
        raise ValueError("torchinfo-mult-adds is not an fvcore count: use count_mult_adds")
    all_handles = flop_handles()
    handles = all_handles if convention == "diffbias" else {}
    if model.__class__.__module__.startswith("fvcore"):
        raise TypeError("count_flops takes the model, not an fvcore analysis")
    counting_inputs = functools.partial(_counting_inputs, model, "count_flops", input_size, in_channels,
                                        num_classes, batch_size)

    def new_analysis(inputs):
        analysis = _flop_count_analysis_class()(model, inputs)
        analysis.set_op_handle(**handles)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return analysis

    was_training = model.training
    model.eval()
    fvcore_logger = logging.getLogger("fvcore")
    previous_level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    counted_on = None
    try:
        with torch.no_grad(), flop_counting(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracer / deprecation chatter, not about counts
            if shape_only:
                try:
                    # torch.device: tensors the forward makes without a device are meta too
                    with _on_meta(model), torch.device("meta"), _meta_mode_class()():
                        analysis = new_analysis(counting_inputs(device="meta"))
                        analysis.total()  # the trace; every statistic below comes from it
                    counted_on = "meta"
                except Exception:  # noqa: BLE001 - something needs real tensors: trace on CPU tensors
                    pass
            if counted_on is None and _has_meta_tensors(model):
                materialize_on_cpu(model)
            if counted_on is None and shape_only:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # only light element-wise work is left: threads cost more than they give
                try:
                    analysis = new_analysis(counting_inputs())
                    with _shape_only_mode_class()():
                        analysis.total()
                    counted_on = "shape-only"
                except Exception:  # noqa: BLE001 - some operator needs real values: trace for real
                    pass
                finally:
                    torch.set_num_threads(threads)
            if counted_on is None:
                analysis = new_analysis(counting_inputs())
                counted_on = "real"
            total = analysis.total()
            by_operator = analysis.by_operator()
            by_module = analysis.by_module_and_operator()
            skipped = analysis.unsupported_ops()
    finally:
        model.train(was_training)
        fvcore_logger.setLevel(previous_level)

    macs = _per_image(total, batch_size)
    rows = [(op, _per_image(v, batch_size)) for op, v in by_operator.most_common()]
    df = pd.DataFrame(rows, columns=["operator", "macs"])
    df["share"] = df["macs"] / macs if macs else 0.0

    # Per module type: the innermost module that ran each op ("self" counts).
    module_totals = {name: sum(c.values()) for name, c in by_module.items()}
    child_sum: Counter[str] = Counter()
    for name, value in module_totals.items():
        if name:
            child_sum[name.rpartition(".")[0]] += value
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    by_type: Counter[str] = Counter()
    for name, value in module_totals.items():
        own = value - child_sum[name]
        if own:
            by_type[types.get(name, "?")] += own
    # Under fvcore-as-shipped the operators with project handles are skipped on purpose: no warning.
    unrecognised = sorted(op for op in skipped if op not in ELEMENTWISE_OPS and op not in all_handles)
    if unrecognised:
        warnings.warn(
            f"fvcore skipped operators that may not be element-wise (no FLOP handle): {unrecognised}; "
            "declare a handle in the backbone's flop_handles (or diffbias.metrics.flops.register_flop_handle)",
            RuntimeWarning,
            stacklevel=2,
        )
    df.attrs["skipped_ops"] = dict(sorted(skipped.items()))
    df.attrs["unrecognised_ops"] = unrecognised
    df.attrs["by_module_type"] = {k: _per_image(v, batch_size) for k, v in by_type.most_common()}
    df.attrs["batch_size"] = batch_size
    df.attrs["shape_only"] = counted_on != "real"
    df.attrs["counted_on"] = counted_on
    df.attrs["convention"] = convention
    return macs, df


def count_mult_adds(
    model: nn.Module, *, input_size: int, in_channels: int, num_classes: int = 0, batch_size: int = 1,
    shape_only: bool = True,
) -> int:
    """torchinfo's "Total mult-adds" per image, without torchinfo (convention ``torchinfo-mult-adds``).

    Re-implements torchinfo 1.8 (``LayerInfo.calculate_macs``, summed in ``ModelStatistics`` over leaf
    modules, once per call): for each parameter of a leaf module named ``weight`` or ``bias``, a module
    whose class name contains "Conv" adds numel x batch x output positions, any other module numel x
    batch; other parameters whose name contains "weight"/"bias" add numel x out.shape[0] x out.shape[1];
    parameters of non-leaf modules (a DiT's pos_embed, DICE's lambda) and other names add nothing. Only
    shapes matter: with ``shape_only`` (default) the forward pass runs on the meta device (weights swapped
    as in :func:`count_flops`), else on CPU tensors with the heavy kernels shape-only
    (``ShapeOnlyHeavyOps``), else normally; ``shape_only=False`` runs it normally.
    """
    total = [0]

    def hook(module, args, output):
        out = output
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor):
            return
        shape = list(out.shape)
        conv = "Conv" in type(module).__name__
        for name, p in module.named_parameters(recurse=False):
            if name in ("weight", "bias"):
                total[0] += p.numel() * (math.prod(shape[:1] + shape[2:]) if conv else shape[0])
            elif "weight" in name or "bias" in name:
                total[0] += p.numel() * math.prod(shape[:2])

    counting_inputs = functools.partial(_counting_inputs, model, "count_mult_adds", input_size, in_channels,
                                        num_classes, batch_size)
    leaves = [m for m in model.modules() if not any(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if shape_only:
                try:  # no trace here, so the meta kernels can run in this thread
                    with _on_meta(model), torch.device("meta"):
                        model(*counting_inputs(device="meta"))
                    return _per_image(total[0], batch_size)
                except Exception:  # noqa: BLE001 - something needs real tensors: run on CPU tensors
                    total[0] = 0
            if _has_meta_tensors(model):
                materialize_on_cpu(model)
            inputs = counting_inputs()
            if shape_only:
                try:
                    with _shape_only_mode_class()():
                        model(*inputs)
                    return _per_image(total[0], batch_size)
                except Exception:  # noqa: BLE001 - shape-only mode unavailable or refused: run for real
                    total[0] = 0
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return _per_image(total[0], batch_size)


def count_macs(
    model: nn.Module, *, convention: str = DEFAULT_CONVENTION, input_size: int, in_channels: int,
    num_classes: int = 0, batch_size: int = 1,
) -> int:
    """Multiply-accumulates per image under ``convention`` (one of :data:`CONVENTIONS`)."""
    _check_convention(convention)
    kw = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, batch_size=batch_size)
    if convention == "torchinfo-mult-adds":
        return count_mult_adds(model, **kw)
    return count_flops(model, convention=convention, **kw)[0]


def macs_without_handles(by_operator: dict[str, int]) -> int:
    """The ``fvcore-as-shipped`` total from a ``diffbias`` per-operator breakdown: every operator that a
    project handle priced is dropped (exactly what a trace without the handles gives; tested)."""
    priced = {name.rpartition("::")[2] for name in flop_handles()}
    return sum(v for op, v in by_operator.items() if op not in priced)


# ----------------------------------------------------------------------------------------------------
# Summary for the report
# ----------------------------------------------------------------------------------------------------


def model_summary(
    preset_or_model: "str | nn.Module",
    *,
    input_size: int | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
    learn_sigma: bool = True,
    options: dict | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Parameters and FLOPs of a preset (built cheaply, see :func:`build_for_counting`) or of a model.

    For a preset, the input defaults to its reference input ``(C, H)`` and class count (else 0).
    Returns ``{name, backbone, params, macs, gflops, input, num_classes, by_operator, by_module_type,
    skipped_ops, reference, params_rel_err, gflops_rel_err, published}`` (the rel_err pair only when the
    preset has those reference counts; relative to the reference, with ``gflops_rel_err`` under the
    reference's convention). ``published`` lists every published count of the preset
    (``Preset.references()``) that applies to this input, each beside our count under its convention:
    ``{source, convention, params, ours_params, gflops, ours_gflops, mult_adds, ours_mult_adds,
    reproducible, note, input, num_classes}`` (GFLOPs and mult-adds in G per image).
    """
    from diffbias.models import PRESETS

    reference: dict[str, Any] = {}
    if isinstance(preset_or_model, nn.Module):
        model = preset_or_model
        name = type(model).__name__
        backbone = getattr(model, "backbone_name", name)
        if input_size is None or in_channels is None:
            raise ValueError("model_summary of a model needs input_size and in_channels")
        num_classes = num_classes or 0
    else:
        name = str(preset_or_model)
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}")
        preset = PRESETS[name]
        backbone, reference = preset.backbone, dict(preset.reference)
        ref_c, ref_h = reference.get("input", (None, None))
        input_size = input_size if input_size is not None else ref_h
        in_channels = in_channels if in_channels is not None else ref_c
        if input_size is None or in_channels is None:
            raise ValueError(f"preset {name!r} has no reference input; pass input_size and in_channels")
        num_classes = num_classes if num_classes is not None else int(reference.get("num_classes", 0))
        model = build_for_counting(
            preset=name, options=options, input_size=input_size, in_channels=in_channels,
            num_classes=num_classes, learn_sigma=learn_sigma,
        )
    params = count_parameters(model)
    macs, df = count_flops(
        model, input_size=input_size, in_channels=in_channels, num_classes=num_classes, batch_size=batch_size
    )
    out: dict[str, Any] = {
        "name": name,
        "backbone": backbone,
        "params": params,
        "macs": macs,
        "gflops": macs / 1e9,
        "input": (in_channels, input_size),
        "num_classes": num_classes,
        "by_operator": dict(zip(df["operator"], df["macs"])),
        "by_module_type": dict(df.attrs["by_module_type"]),
        "skipped_ops": dict(df.attrs["skipped_ops"]),
        "reference": reference,
    }
    out["published"] = published = []
    if not isinstance(preset_or_model, nn.Module):
        for ref in PRESETS[name].references():
            if tuple(ref.get("input", (in_channels, input_size))) != (in_channels, input_size) or \
                    int(ref.get("num_classes", num_classes)) != num_classes:
                continue  # counted at another input: not comparable
            row = {"source": ref.get("source"), "convention": ref["convention"], "params": ref.get("params"),
                   "ours_params": params, "gflops": ref.get("gflops"), "ours_gflops": None,
                   "mult_adds": ref.get("mult_adds"), "ours_mult_adds": None,
                   "reproducible": bool(ref.get("reproducible", True)), "note": ref.get("note"),
                   "input": (in_channels, input_size), "num_classes": num_classes}
            if ref.get("gflops") is not None:
                row["ours_gflops"] = gflops_under(out, ref["convention"], model=model, batch_size=batch_size)
            if ref.get("mult_adds") is not None:
                row["ours_mult_adds"] = count_mult_adds(model, input_size=input_size, in_channels=in_channels,
                                                        num_classes=num_classes) / 1e9
            published.append(row)
    if "params" in reference:
        out["params_rel_err"] = params / reference["params"] - 1
    if "gflops" in reference:
        convention = reference.get("convention", DEFAULT_CONVENTION)
        ours = gflops_under(out, convention, model=model, batch_size=batch_size)
        out["gflops_rel_err"] = ours / reference["gflops"] - 1
    return out


def gflops_under(summary: dict[str, Any], convention: str, *, model: nn.Module | None = None,
                 batch_size: int = 1) -> float:
    """G multiply-accumulates per image of a :func:`model_summary` under ``convention``."""
    _check_convention(convention)
    if convention == "diffbias":
        return summary["macs"] / 1e9
    if convention == "fvcore-as-shipped":
        return macs_without_handles(summary["by_operator"]) / 1e9
    if model is None:
        raise ValueError("torchinfo-mult-adds needs the model")
    c, h = summary["input"]
    return count_mult_adds(model, input_size=h, in_channels=c, num_classes=summary["num_classes"],
                           batch_size=batch_size) / 1e9


# ----------------------------------------------------------------------------------------------------
# Published counts beside ours (per-study counts table, scripts/preset_counts.py)
# ----------------------------------------------------------------------------------------------------


def published_counts(preset: str, options: dict | None = None) -> list[dict[str, Any]]:
    """Every published count of ``preset`` beside ours, each at the reference's input and under its own
    convention (the ``published`` rows of :func:`model_summary`). Empty when the preset has none, or
    when ``options`` change the model (then it is not the published model)."""
    from diffbias.models import PRESETS

    if preset not in PRESETS or not PRESETS[preset].references():
        return []
    def norm(value: Any) -> Any:  # options may have been through JSON (tuples become lists)
        return [norm(v) for v in value] if isinstance(value, (list, tuple)) else value

    if options and any(norm(PRESETS[preset].options.get(k, object())) != norm(v) for k, v in options.items()):
        return []
    return model_summary(preset)["published"]


def format_params(value: float) -> str:
    """178425240 -> "178,425,240" (an exact count), 505e6 -> "505M", 1.06e9 -> "1.06B" (a rounded one)."""
    v = float(value)
    if v % 1e4:
        return f"{int(v):,}"
    return f"{v / 1e9:g}B" if v >= 1e9 else f"{v / 1e6:g}M"


def format_published(rows: list[dict[str, Any]]) -> str:
    """One line per published count: ``source [convention]: published (ours) ...``; "" when none."""
    out = []
    for r in rows:
        parts = []
        if r.get("params") is not None:
            parts.append(f"{format_params(r['params'])} params (ours {r['ours_params']:,})")
        if r.get("gflops") is not None:
            parts.append(f"{r['gflops']:g} GFLOPs (ours {r['ours_gflops']:.2f})")
        if r.get("mult_adds") is not None:
            parts.append(f"{r['mult_adds']:g} G mult-adds [torchinfo-mult-adds] (ours {r['ours_mult_adds']:.2f})")
        where = ""
        if r.get("input"):
            c, h = r["input"]
            where = f", {c}x{h}x{h}" + (f", {r['num_classes']} classes" if r.get("num_classes") else "")
        line = f"{r['source']} [{r['convention']}{where}]: " + ", ".join(parts)
        if not r.get("reproducible", True):
            line += f" - not reproducible: {r.get('note') or 'no configuration gives it'}"
        out.append(line)
    return "; ".join(out)
