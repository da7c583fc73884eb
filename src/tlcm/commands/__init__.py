"""CLI subcommands, one module each.

Every module here defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. :mod:`tlcm.cli`
discovers them, so adding a command never touches a shared file. Modules parse and validate only; the work is done
by the public Python API they call.
"""
