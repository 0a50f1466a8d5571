"""histreg-bench: a benchmark of initial affine alignment methods for differently stained histology.

The public surface for method authors::

    from bench import Method, Estimate, ImageView, Context, RegistrationFailed, register
"""

from bench.method import Context, Estimate, ImageView, Method, RegistrationFailed
from bench.registry import register

__version__ = "0.1.0"
__all__ = ["Context", "Estimate", "ImageView", "Method", "RegistrationFailed", "register", "__version__"]
