"""Host-side launchers, one module per kernel family in ``kernels/`` (same names)."""
