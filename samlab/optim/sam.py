"""`SAM`: the torch.optim-style two-step optimizer (SAM, or ASAM with adaptive=True)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from samlab.optim.perturbations import perturbation
from samlab.validation import check_number


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer (Foret et al., ICLR 2021).

    first_step: eps = rho * g / ‖g‖ with g the gradient in `.grad` (the norm taken over all param
    groups together, rho read per group), w <- w + eps, the old weights kept in the state.
    With adaptive=True the rule is ASAM's (Kwon et al., ICML 2021): eps = rho * T² g / ‖T g‖,
    T = |w| + adaptive_eta elementwise (adaptive_eta read per group).
    second_step: w <- the saved copy (not w - eps, which would drift in floating point), then
    the base optimizer steps with the gradient in `.grad`, i.e. grad L(w + eps).

    `base_optimizer` is a class; it is built on this optimizer's param_groups, so both share the
    same group dicts and an LR scheduler attached to either one changes both. The perturbation
    rule is the one `samlab.optim.sharpness_gradient` uses (`samlab.optim.perturbations`).

    This class sees parameters only: with BatchNorm the second forward also updates the running
    statistics unless the caller prevents it (`sharpness_gradient` handles that for a model).

    Usage::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
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
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"base_optimizer: must be a torch.optim.Optimizer class such as torch.optim.SGD (got {base_optimizer!r})"
            )
        check_number("rho", rho, lower=0.0)
        check_number("adaptive_eta", adaptive_eta, lower=0.0)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive: must be True or False (got {adaptive!r})")
        defaults = dict(rho=rho, adaptive=adaptive, adaptive_eta=adaptive_eta, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """w <- w + eps with eps from the current `.grad`; the unperturbed weights are saved."""
        rule = self._rule()
        params, grads, rhos, etas = [], [], [], []
        for index, group in enumerate(self.param_groups):
            rho = check_number(f"param_groups[{index}]['rho']", group["rho"], lower=0.0)
            eta = check_number(f"param_groups[{index}]['adaptive_eta']", group["adaptive_eta"], lower=0.0)
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    rhos.append(rho)
                    etas.append(eta)
        if not params:
            raise ValueError("first_step: no parameter has a .grad; run backward() first")
        eps = perturbation(rule, grads, params, rhos, etas)
        for p, e in zip(params, eps, strict=True):
            self.state[p]["old_p"] = p.detach().clone()
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights, then step the base optimizer with the perturbed gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state.pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

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

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's state (saved weights between the two steps) and the base optimizer's."""
        return {"sam": super().state_dict(), "base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"sam", "base"}:
            raise ValueError("state_dict: expected the dict SAM.state_dict() returns, with keys 'sam' and 'base'")
        self.base_optimizer.load_state_dict(state_dict["base"])
        super().load_state_dict(state_dict["sam"])
        self.param_groups = self.base_optimizer.param_groups  # share the group dicts again

    def _rule(self) -> str:
        adaptive = {bool(group["adaptive"]) for group in self.param_groups}
        if len(adaptive) != 1:
            raise ValueError("adaptive: must be the same in every param group (SAM and ASAM perturb with one norm)")
        return "adaptive" if adaptive.pop() else "normalized"
