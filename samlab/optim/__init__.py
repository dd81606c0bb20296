"""The SAM family: `sharpness_gradient` (every method, one function) and the `SAM` optimizer class.

Both share the perturbation rules of `samlab.optim.perturbations` (eps = rho * direction(g, w)).
"""

from samlab.config import METHODS
from samlab.optim.sam import SAM
from samlab.optim.sharpness import sample_scores, sharpness_gradient

__all__ = ["METHODS", "SAM", "sample_scores", "sharpness_gradient"]
