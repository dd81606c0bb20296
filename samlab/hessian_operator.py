"""The Hessian of a model's mean loss as a linear operator on flat parameter vectors.

`HessianOperator` is the one mechanism every curvature analysis in samlab goes through: it maps a
flat vector v (the selected parameters concatenated in `model.named_parameters()` order, each
flattened row-major) to H v, where H = ∇²_w L(w) and L is the mean loss over the given data.

Two ways to compute H v:
- "autograd": reverse-over-reverse (double backward), H v = ∇_w ⟨∇_w L(w), v⟩. The graph of
  ∇_w L (one forward and one backward with create_graph) is built once per batch and kept while it
  fits `graph_budget_mb`, so each product costs one backward through it (in eval mode one graph over
  all batches together, since samples do not interact there). On accelerators several
  vectors go through one batched backward (`is_grads_batched`); on a CPU one after another, since
  batching turns each convolution into a grouped one, which CPU kernels run slower.
- "func": forward-over-reverse, H v = d/dt ∇L(w + t v) at t = 0, i.e. `torch.func.jvp` of
  `torch.func.grad` of the loss written with `functional_call` on a flat vector; several vectors go
  through one `vmap`ped pass (Pearlmutter 1994; the torch.func "hvp" recipe). Every product runs the
  forward and the backward again (with tangents).
"auto" is "autograd": with the gradient's graph kept, a product is one pass over that graph where
forward-over-reverse runs a forward and a backward, each carrying tangents (measured on the digits
CNN, 512 samples, one CPU thread: 26–39 ms against 57–113 ms per vector; benchmarks/hessian_vs_pyhessian.py
compares both).

In eval mode on a CPU with `threads` > 1 (default: torch's intra-op thread count; in a run worker, the most its
thread governor allows, `samlab.runs.cores.thread_budget`, and per product the count it allows now) the "autograd"
products are split over the samples: each of `threads` worker threads keeps the graph of its share of
them (or, when the graphs do not fit the budget, builds those of its batches), runs its backwards with
one intra-op thread, and the shares' products are summed in a fixed order; while the operator is open,
the calling thread runs with one intra-op thread too (restored on leaving, unless its count was changed
meanwhile, e.g. by a run worker's thread governor). Train mode stays in the calling thread (dropout's
masks would be drawn in no fixed order). The ops of one product are too small for torch's own intra-op
threads to pay (two of them took 1.5 times one's CPU for a 1.3 times shorter product on the digits CNN,
and 4–30 times longer while other processes kept both cores busy); whole backwards side by side do not
wait for each other within an op.

The model's mode is explicit: "eval" (BatchNorm uses its running statistics, dropout is off) or
"train" (BatchNorm normalises with the batch statistics). In train mode BatchNorm's running-statistic
updates are switched off while the operator is open, so computing H never changes a buffer; entering
and leaving the operator (a context manager) restores every module's mode.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from samlab.runs.cores import thread_budget, threads_now
from samlab.tensors import MODES, Batch, Data, LossFn, ParamSelection, model_mode

IMPLS = ("auto", "func", "autograd")


class HessianOperator:
    """v ↦ H v for the mean loss of `model` over `data`, restricted to the parameters `params`.

    `data` is one (x, y) batch or an iterable of batches; the loss is averaged over all samples,
    i.e. batch losses are weighted by batch size. Floating-point inputs and targets are cast to the
    parameters' dtype and everything is moved to the parameters' device. `loss_fn(outputs, targets)`
    returns the mean loss (a per-sample loss vector is averaged). `params` is a list of parameter
    names or of the model's parameter tensors (None: every parameter that requires grad).

    Use as a context manager: entering sets the mode, leaving restores the model's modes.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        *,
        params: ParamSelection = None,
        mode: str = "eval",
        impl: str = "auto",
        chunk_size: int = 16,
        graph_budget_mb: float = 2048.0,
        threads: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)} (got {mode!r})")
        if impl not in IMPLS:
            raise ValueError(f"impl: must be one of {', '.join(IMPLS)} (got {impl!r})")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be a positive integer (got {chunk_size!r})")
        if isinstance(graph_budget_mb, bool) or not isinstance(graph_budget_mb, (int, float)) or graph_budget_mb < 0:
            raise ValueError(f"graph_budget_mb: must be a number >= 0 (got {graph_budget_mb!r})")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads: must be a positive integer or None (got {threads!r})")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.impl = "autograd" if impl == "auto" else impl
        self.chunk_size = chunk_size
        self.graph_budget_mb = float(graph_budget_mb)
        self._graphs: dict[int, tuple[torch.Tensor, ...]] | None = None  # batch index -> ∇L with its graph
        self.names = select_parameter_names(model, params)
        named = dict(model.named_parameters())
        self._selected = [named[n] for n in self.names]
        self.shapes = [p.shape for p in self._selected]
        self.numels = [p.numel() for p in self._selected]
        self.dim = sum(self.numels)
        self.device = self._selected[0].device
        self.dtype = self._selected[0].dtype
        self.batches = as_batches(data, self.device, self.dtype)
        self.n_samples = sum(len(x) for x, _ in self.batches)
        self._graph_batches = self.batches
        self.n_hvp = 0
        self._fixed = {n: p.detach() for n, p in named.items() if n not in set(self.names)}
        self._func_hvp = self._build_func_hvp()
        self._restore: contextlib.ExitStack | None = None
        # worker threads for the products (see the module docstring): CPU "autograd" products in eval mode
        # (in train mode dropout draws its masks from the global generator: in threads, in no fixed order)
        parallel = self.device.type == "cpu" and self.impl == "autograd" and mode == "eval"
        self.threads = (threads or thread_budget(torch.get_num_threads())) if parallel else 1
        self._pool: ThreadPoolExecutor | None = None
        self._main_threads: int | None = None

    # -- context: the model's mode ---------------------------------------------------------------
    def __enter__(self) -> HessianOperator:
        self._restore = contextlib.ExitStack()
        self._restore.enter_context(model_mode(self.model, self.mode))
        if self.mode == "eval":
            self._restore.enter_context(batchnorm_as_affine(self.model))
        if self.threads > 1:  # the workers hold the cores; the caller's own ops (Lanczos, QR) take one
            self._main_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._graphs = None  # the kept graphs hold activations: free them with the operator
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._main_threads is not None:
            if torch.get_num_threads() == 1:  # unless someone else (a worker's thread governor) set it since
                torch.set_num_threads(self._main_threads)
            self._main_threads = None
        if self._restore is not None:
            self._restore.close()
            self._restore = None

    # -- flat vectors ------------------------------------------------------------------------------
    def flat_params(self) -> torch.Tensor:
        """The selected parameters as one flat vector (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self._selected])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector (last dimension `dim`) → {name: tensor of the parameter's shape}."""
        pieces = torch.split(flat, self.numels, dim=-1)
        lead = flat.shape[:-1]
        return {n: piece.reshape(*lead, *shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}

    def random_vectors(self, count: int, seed: int, kind: str = "gaussian") -> torch.Tensor:
        """[count, dim] Gaussian or Rademacher vectors from a CPU generator (same numbers on any device)."""
        gen = torch.Generator().manual_seed(int(seed))
        if kind == "gaussian":
            out = torch.randn(count, self.dim, generator=gen, dtype=torch.float64)
        elif kind == "rademacher":
            out = torch.randint(0, 2, (count, self.dim), generator=gen).to(torch.float64).mul_(2).sub_(1)
        else:
            raise ValueError(f"kind: must be 'gaussian' or 'rademacher' (got {kind!r})")
        return out.to(device=self.device, dtype=self.dtype)

    # -- products ----------------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length `dim`."""
        return self.matmat(v.reshape(1, -1))[0]

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        """H applied to each row of `vectors` ([k, dim] → [k, dim]), `chunk_size` rows per pass."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"v: expected shape [k, {self.dim}] (flat parameter vectors), got {list(vectors.shape)}")
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        chunks = [self._apply(chunk) for chunk in torch.split(vectors, self.chunk_size)]
        self.n_hvp += len(vectors)
        return torch.cat(chunks)

    def _apply(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.impl == "func":
            return self._weighted_sum(self._func_hvp, vectors, self.batches)
        if self._graphs is None and self._fits_budget():
            self._graphs = {}
            if self.mode == "eval":
                self._graph_batches = self._shards()
        return self._weighted_sum(self._autograd_hvp, vectors, self._graph_batches)

    def _shards(self) -> list[Batch]:
        """Samples do not interact in eval mode: one graph over all of them (one backward per product),
        or one per worker thread over a contiguous share of them."""
        if len(self.batches) == 1:
            x, y = self.batches[0]
        else:
            x, y = torch.cat([x for x, _ in self.batches]), torch.cat([y for _, y in self.batches])
        count = min(self.threads, len(x))
        return list(zip(torch.tensor_split(x, count), torch.tensor_split(y, count)))

    def _weighted_sum(self, batch_hvp: Callable, vectors: torch.Tensor, batches: list[Batch]) -> torch.Tensor:
        """Σ_batches (|batch| / n) H_batch v; with worker threads, share j holds batches j, j + threads, …,
        each share's sum is computed by one worker (one intra-op thread), and the shares' sums are added
        in share order. A run worker's thread governor may allow fewer threads for a while
        (`threads_now`): the shares are then spread over that many workers, with the same sums."""
        workers = min(self.threads, len(batches))
        if workers == 1:
            return self._batch_sum(batch_hvp, vectors, batches, range(len(batches)))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hvp", initializer=torch.set_num_threads,
                                            initargs=(1,))  # fmt: skip
        shares = [range(j, len(batches), workers) for j in range(workers)]
        lanes = max(1, min(workers, threads_now(workers)))

        def lane_sums(lane: int) -> list[torch.Tensor]:
            return [self._batch_sum(batch_hvp, vectors, batches, share) for share in shares[lane::lanes]]

        by_lane = list(self._pool.map(lane_sums, range(lanes)))
        parts = [by_lane[j % lanes][j // lanes] for j in range(workers)]  # share order
        total = parts[0]
        for part in parts[1:]:
            total.add_(part)
        return total

    def _batch_sum(self, batch_hvp: Callable, vectors: torch.Tensor, batches: list[Batch], share: range) -> torch.Tensor:
        total = torch.zeros_like(vectors)
        for index in share:
            x, y = batches[index]
            total.add_(batch_hvp(vectors, index, x, y), alpha=len(x) / self.n_samples)
        return total

    def _build_func_hvp(self) -> Callable:
        def loss_at(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            outputs = functional_call(self.model, {**self._fixed, **self.unflatten(flat)}, (x,))
            return as_scalar_loss(self.loss_fn(outputs, y))

        gradient = grad(loss_at)

        def hvp_one(v: torch.Tensor, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return jvp(lambda flat: gradient(flat, x, y), (w,), (v,))[1]

        hvp_many = vmap(hvp_one, in_dims=(0, None, None, None), randomness="same")

        def batch_hvp(vectors: torch.Tensor, _index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            w = self.flat_params()
            if len(vectors) == 1:
                return hvp_one(vectors[0], w, x, y).unsqueeze(0)
            return hvp_many(vectors, w, x, y)

        return batch_hvp

    def _autograd_hvp(self, vectors: torch.Tensor, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """H_batch v for each row: one backward through ∇L's graph (kept, or built for this call)."""
        with torch.enable_grad():
            grads = self._gradient_graph(index, x, y)
            keep = self._graphs is not None
            pieces = self.unflatten(vectors)
            outputs = [pieces[n] for n in self.names]
            if len(vectors) > 1 and self.device.type != "cpu":
                try:
                    hv = torch.autograd.grad(grads, self._selected, grad_outputs=outputs, retain_graph=keep,
                                             allow_unused=True, is_grads_batched=True)
                    return self._flat_rows(hv, len(vectors))
                except RuntimeError:  # an operation without a batching rule: one vector at a time
                    keep = True
            rows = []
            for i in range(len(vectors)):
                # ∇⟨∇L, v⟩: the same backward as grad_outputs=v, without torch's shape check of grad_outputs
                # (its first use imports sympy, ~0.6 s)
                dot = sum(torch.vdot(g.reshape(-1), o[i].reshape(-1)) for g, o in zip(grads, outputs))
                hv = torch.autograd.grad(dot, self._selected, retain_graph=keep or i < len(vectors) - 1,
                                         allow_unused=True)  # fmt: skip
                rows.append(self._flat_rows([None if h is None else h.unsqueeze(0) for h in hv], 1))
            return torch.cat(rows)

    def _flat_rows(self, pieces: Sequence[torch.Tensor | None], count: int) -> torch.Tensor:
        return torch.cat([
            torch.zeros(count, n, device=self.device, dtype=self.dtype) if h is None else h.reshape(count, -1)
            for h, n in zip(pieces, self.numels)
        ], dim=1).detach()  # fmt: skip

    def _gradient_graph(self, index: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """∇_w L of one batch with its graph (create_graph): kept for the next products when the
        graphs of all batches fit `graph_budget_mb`, else built anew for every call."""
        if self._graphs is not None and index in self._graphs:
            return self._graphs[index]
        loss = as_scalar_loss(self.loss_fn(self.model(x), y))
        grads = torch.autograd.grad(loss, self._selected, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p, requires_grad=True) if g is None else g
                      for g, p in zip(grads, self._selected))
        if self._graphs is not None:
            self._graphs[index] = grads
        return grads

    def _fits_budget(self) -> bool:
        """Whether the graphs of all batches fit: bytes saved for backward on a slice of a batch, scaled."""
        if self.graph_budget_mb <= 0:
            return False
        x, y = self.batches[0]
        probe = min(len(x), 8)
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = as_scalar_loss(self.loss_fn(self.model(x[:probe]), y[:probe]))
            torch.autograd.grad(loss, self._selected, create_graph=True, allow_unused=True)
        return saved[0] * self.n_samples / probe <= self.graph_budget_mb * 2**20


# -- eval-mode BatchNorm ---------------------------------------------------------------------------
@contextlib.contextmanager
def batchnorm_as_affine(model: nn.Module) -> Iterator[None]:
    """Eval-mode BatchNorm layers (running statistics) computed as the per-channel affine map they are,
    x ↦ x·a + c with a = γ/√(σ² + ε), c = β − μ·a, for the block; their forwards are restored after.

    The same function of x, γ and β, but its second derivatives are a few broadcast products, where
    autograd's double backward of `F.batch_norm` evaluates the general (batch-statistics) formula over
    the whole activation: about 40 % of a Hessian-vector product of the digits CNN.
    Layers in train mode or without running statistics are left alone.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and not m.training and m.running_mean is not None and m.running_var is not None]  # fmt: skip
    own = [("forward" in vars(m), vars(m).get("forward")) for m in layers]
    for m in layers:
        m.forward = types.MethodType(_affine_batchnorm_forward, m)
    try:
        yield
    finally:
        for m, (had, forward) in zip(layers, own):
            if had:
                m.forward = forward
            else:
                del m.forward


def _affine_batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if self.training or self.running_mean is None or self.running_var is None:  # e.g. a deep copy put in train mode
        return type(self).forward(self, x)
    self._check_input_dim(x)
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


# -- helpers shared by the analyses ----------------------------------------------------------------
def select_parameter_names(model: nn.Module, params: ParamSelection) -> list[str]:
    """Names of the selected parameters in model order (None: all that require grad)."""
    named = list(model.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
    else:
        items = list(params)
        by_id = {id(p): n for n, p in named}
        known = {n for n, _ in named}
        wanted = set()
        for item in items:
            if isinstance(item, str):
                if item not in known:
                    raise ValueError(f"params: {item!r} is not a parameter of the model; known: {sorted(known)}")
                wanted.add(item)
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                wanted.add(by_id[id(item)])
            else:
                raise ValueError("params: expected parameter names or the model's own parameter tensors")
        names = [n for n, _ in named if n in wanted]
    if not names:
        raise ValueError("params: the selection is empty (no parameter requires grad)")
    return names


def as_batches(data: Data, device: torch.device, dtype: torch.dtype) -> list[Batch]:
    """One (x, y) batch or an iterable of batches → a list of batches on `device` (floats in `dtype`)."""
    if _is_batch(data):
        batches = [data]
    else:
        try:
            batches = list(data)
        except TypeError:
            raise ValueError("data: expected an (x, y) batch or an iterable of (x, y) batches") from None
        if not batches or not all(_is_batch(b) for b in batches):
            raise ValueError("data: expected an (x, y) batch or a non-empty iterable of (x, y) batches")
    out = []
    for x, y in batches:
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"data: a batch has {len(x)} inputs and {len(y)} targets (need equal, > 0)")
        out.append((_to(x, device, dtype), _to(y, device, dtype)))
    return out


def as_scalar_loss(loss: torch.Tensor) -> torch.Tensor:
    return loss if loss.ndim == 0 else loss.mean()


def _is_batch(item: Any) -> bool:
    return (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and all(isinstance(t, torch.Tensor) for t in item)
    )


def _to(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _zeros_if_none(h: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if h is None else h
