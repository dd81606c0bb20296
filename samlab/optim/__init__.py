"""The SAM family: `sharpness_gradient` (every method, one function) and the `SAM` optimizer class.

Both share the perturbation rules of `samlab.optim.perturbations` (eps = rho * direction(g, w)).
`sam_step` is one step of the class over a batch: chunks, mixed precision, clipping, DDP.
"""

from samlab.config import METHODS
from samlab.optim.dropin import sam_step
from samlab.optim.sam import SAM, SAM_METHODS
from samlab.optim.sharpness import sample_scores, sharpness_gradient

__all__ = ["METHODS", "SAM", "SAM_METHODS", "sam_step", "sample_scores", "sharpness_gradient"]
