"""JAX ops over compressed weights: XLA FFI calls, one target name per op on every platform.

Importing any op module registers the targets (`registry`).
"""

from . import registry  # noqa: F401
