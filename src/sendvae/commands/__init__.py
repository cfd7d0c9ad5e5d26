"""One module per top-level ``sendvae`` command; each defines ``register(subparsers)``.

Helpers shared by commands live in :mod:`sendvae.commands._common` (modules whose name starts
with an underscore are not commands).
"""
