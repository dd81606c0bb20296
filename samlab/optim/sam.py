"""`SAM`: the torch.optim-style two-step optimizer of the SAM family, for any training loop.

Beyond first_step / second_step it handles what a real loop needs: a gradient scaler (each pass
unscaled exactly once, the step skipped when either pass overflows), gradient accumulation over
the whole batch or one perturbation per micro-batch (`micro_step`), clipping of the descent
gradient, DistributedDataParallel (`no_sync` for the first pass), BatchNorm statistics from the
unperturbed pass only (`model=`), and state_dict round trips. `samlab.optim.dropin.sam_step` is
the reference loop that puts these together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from samlab.config import METHODS
from samlab.optim.perturbations import METHOD_RULES, global_norm, perturbation
from samlab.validation import check_choice, check_number

# The methods that perturb; they differ in what the caller's first pass computes (see the class docstring).
# ghostbn is not a rule of its own: it is `sam` whose forwards the caller runs in micro-batches of m (each
# normalised with its own BatchNorm statistics), so the class takes it as method="sam".
SAM_METHODS = tuple(m for m in METHODS if METHOD_RULES[m] is not None and m != "ghostbn")


class _PassGradients:
    """The gradients of one pass, as GradScaler.unscale_ sees an optimizer: its param_groups.

    GradScaler allows one unscale_ per optimizer between updates and keys its overflow record by the
    object, so each first pass gets its own key: every pass is unscaled exactly once, and
    scaler.update() backs off when any recorded pass (first or second) overflowed.
    """

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.param_groups = param_groups


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer (Foret et al., ICLR 2021).

    first_step: eps = rho * d(g, w) with g the gradient in `.grad` (the norm taken over all param
    groups together, rho read per group), w <- w + eps, the old weights kept in the state.
    second_step: w <- the saved copy (not w - eps, which would drift in floating point), then the
    base optimizer steps with the gradient in `.grad`, i.e. grad L(w + eps).

    The rule d follows `method` (`samlab.optim.perturbations`): sam, nsam, msam, rwsam: g / ‖g‖;
    asam (or adaptive=True; Kwon et al., ICML 2021): T² g / ‖T g‖, T = |w| + adaptive_eta
    elementwise; usam: g. What the caller's first pass backpropagates selects the method: the
    batch's loss (sam, asam, usam), the loss of an independent batch (nsam), the sample-weighted
    loss Σ_i p_i f_i with p = softmax(lam * samlab.optim.sample_scores(...)) (rwsam), or one
    micro-batch's loss with one perturbation per micro-batch through `micro_step` (msam).

    `base_optimizer` is a class; it is built on this optimizer's param_groups, so both share the
    same group dicts and an LR scheduler attached to either one changes both.

    `model` (optional, the module or its DistributedDataParallel wrapper): its buffers (BatchNorm
    running statistics) are saved at first_step and restored at second_step / micro_step, so only
    the unperturbed pass updates them; `no_sync()` then knows the module to silence.

    Mixed precision: pass the torch.amp.GradScaler to first_step and second_step. first_step
    unscales the first pass's gradients (once) before eps is built; second_step unscales the
    second pass's (once), clips, and steps through the scaler, then calls scaler.update(). When
    either pass has an inf or NaN gradient the base optimizer does not step (weights, their saved
    copy and the base optimizer's state stay as before the step) and the scale backs off exactly
    as torch's own skipped step does.

    Usage::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    or `opt.step(closure)` with a closure that runs forward and backward and returns the loss.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        *,
        method: str = "sam",
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer: must be a torch.optim.Optimizer class such as torch.optim.SGD (got {base_optimizer!r})"
            )
        check_number("rho", rho, lower=0.0)
        check_number("adaptive_eta", adaptive_eta, lower=0.0)
        check_choice("method", method, SAM_METHODS)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive: must be True or False (got {adaptive!r})")
        if adaptive and method not in ("sam", "asam"):
            raise ValueError(f"adaptive: True is method 'asam' (got method {method!r})")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model: must be a torch.nn.Module or None (got {type(model).__name__})")
        method = "asam" if adaptive else method
        defaults = dict(rho=rho, adaptive=method == "asam", adaptive_eta=adaptive_eta, method=method, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self._saved_buffers: list[torch.Tensor] | None = None
        self._pass_keys: list[_PassGradients] = []  # alive until scaler.update(): distinct ids
        self._overflowed = False

    # -- the two steps ------------------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
        """w <- w + eps with eps from the current `.grad`; the unperturbed weights are saved.

        With `scaler`, the gradients are unscaled first (once); an inf or NaN among them leaves w
        unperturbed and marks the step to be skipped by second_step. With per-micro-batch
        accumulation, `.grad` is then set to the descent gradient put aside by `micro_step`, so the
        second pass adds to it (under DDP its synchronized backward all-reduces the whole sum).
        Returns ‖g‖ (unscaled) as a tensor, without a device sync.
        """
        rule = self._rule()
        params, rhos, etas = self._params_with_grad()
        if any("old_p" in self.state.get(p, {}) for p in params):
            raise ValueError("first_step: the weights are still perturbed; call micro_step or second_step first")
        if scaler is not None:
            key = _PassGradients(self.param_groups)
            self._pass_keys.append(key)
            scaler.unscale_(key)
        grads = [p.grad for p in params]  # read after unscale_, which may replace sparse gradients
        norm = global_norm(grads)
        if self.model is not None:
            self._saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        if scaler is not None and not bool(torch.isfinite(norm)):
            self._overflowed = True
        else:
            eps = perturbation(rule, grads, params, rhos, etas)
            for p, e in zip(params, eps, strict=True):
                self.state[p]["old_p"] = p.detach().clone()
                p.add_(e)
        if zero_grad:
            self.zero_grad()
        self._restore_descent()
        return norm

    @torch.no_grad()
    def micro_step(self) -> None:
        """End one micro-batch of per-micro-batch accumulation (m-SAM): restore w and the buffers, and
        put `.grad` (the descent gradient so far) aside until the next first_step."""
        self._restore()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["descent"] = p.grad
                    p.grad = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None,
                    clip_grad_norm: float | None = None) -> bool:
        """Restore the saved weights (and buffers), then step the base optimizer with the perturbed gradient.

        The order: restore w; with `scaler`, unscale `.grad` (once); clip `.grad`, the descent
        gradient, to total norm `clip_grad_norm` (torch.nn.utils.clip_grad_norm_ over all groups);
        base step, through `scaler.step` when given, skipped when either pass overflowed;
        `scaler.update()`. Returns whether the base optimizer stepped.
        """
        if clip_grad_norm is not None:
            check_number("clip_grad_norm", clip_grad_norm, lower=0.0, open_lower=True)
        self._restore()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        stepped = not self._overflowed
        if scaler is not None and stepped:
            scaler.unscale_(self.base_optimizer)
            stepped = bool(torch.isfinite(global_norm([p.grad for p in params]))) if params else True
        if stepped and clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        if stepped:
            if scaler is not None:
                scaler.step(self.base_optimizer)  # already unscaled: torch does not unscale again
            else:
                self.base_optimizer.step()
            self._opt_called = True  # what torch's LR scheduler checks: this optimizer has stepped
        if scaler is not None:
            scaler.update()
        self._pass_keys.clear()
        self._overflowed = False
        if zero_grad:
            self.zero_grad()
        return stepped

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Both steps; `closure` runs forward + backward and returns the loss. Returns the loss at w."""
        if closure is None:
            raise ValueError("closure: SAM.step needs a closure that runs forward and backward and returns the loss")
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def no_sync(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager:
        """A context in which forward and backward run without DistributedDataParallel's gradient all-reduce.

        Wrap the first pass (forward and backward: DDP decides at forward time whether the backward
        synchronizes) so each replica perturbs with its own gradient; the second pass then runs
        outside it and its backward averages the descent gradient. `model` defaults to the one
        given to the constructor; for anything but a DistributedDataParallel module this does nothing.
        """
        model = self.model if model is None else model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This optimizer's state (saved weights between the two steps) and the base optimizer's."""
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"sam", "base"}:
            raise ValueError("state_dict: expected the dict SAM.state_dict() returns, with keys 'sam' and 'base'")
        self.base_optimizer.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["sam"])
        self.param_groups = self.base_optimizer.param_groups  # share the group dicts again

    # -- helpers -------------------------------------------------------------------------------------
    def _params_with_grad(self) -> tuple[list[torch.Tensor], list[float], list[float]]:
        params, rhos, etas = [], [], []
        for index, group in enumerate(self.param_groups):
            rho = check_number(f"param_groups[{index}]['rho']", group["rho"], lower=0.0)
            eta = check_number(f"param_groups[{index}]['adaptive_eta']", group["adaptive_eta"], lower=0.0)
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    rhos.append(rho)
                    etas.append(eta)
        if not params:
            raise ValueError("first_step: no parameter has a .grad; run backward() first")
        return params, rhos, etas

    def _restore(self) -> None:
        """The unperturbed weights, and the buffers as the unperturbed pass left them."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state.pop("old_p"))
        if self._saved_buffers is not None:
            for buf, saved in zip(self.model.buffers(), self._saved_buffers, strict=True):
                buf.copy_(saved)
            self._saved_buffers = None

    def _restore_descent(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "descent" in state:
                    p.grad = state.pop("descent")

    def _rule(self) -> str:
        rules = set()
        for group in self.param_groups:
            method = "asam" if group["adaptive"] else group.get("method", "sam")
            check_choice("method", method, SAM_METHODS)
            rules.add(METHOD_RULES[method])
        if len(rules) != 1:
            raise ValueError("method: every param group must perturb with one rule (SAM, ASAM and USAM "
                             f"perturb with different norms; got {sorted(rules)})")
        return rules.pop()
