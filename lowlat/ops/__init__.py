"""Host-side launchers, one module per kernel family in ``kernels/`` (same names)."""


def low_latency_specs(config) -> list:
    """Every kernel specialisation a low-latency Buffer with ``config`` (a ``KernelConfig``) loads."""
    from . import combine, dispatch, exchange

    return [exchange.exchange_spec(config), *dispatch.all_specs(config), *combine.all_specs(config)]
