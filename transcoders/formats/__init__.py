"""Weight formats: reading and writing transcoders in circuit-tracer's, SAELens',
GemmaScope's and sparsify's layouts, published sets by hub id or preset, and the hook
names each maps to. May import the transcoders core (clt, device, identity), never
tracer or graphstore."""

from transcoders.formats.registry import *  # noqa: F403
from transcoders.formats.registry import __all__  # noqa: F401
