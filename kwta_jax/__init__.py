"""kwta-jax: k-Winners-Take-All activations for JAX and Flax.

The op (`kwta`) is a pure function; `kwta_jax.layers` wraps it for Flax NNX and linen.
"""

from kwta_jax.ops import kwta, kwta_bpda, kwta_mask, num_winners

__version__ = "0.1.0"

__all__ = ["kwta", "kwta_bpda", "kwta_mask", "num_winners", "__version__"]
