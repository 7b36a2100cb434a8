"""The localrefine engine: pure NumPy, imports no Scipion module.

Modules each do one job; see ``docs/architecture.md`` for the map and
``docs/conventions.md`` for axes, Euler angles, Fourier layout and shift signs.
"""
