"""Latency microbenchmarks with same-run baselines: ``python -m lowlat.bench`` (see ``__main__``)."""
