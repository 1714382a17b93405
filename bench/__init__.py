"""Benchmarks: the pipeline against plain transformers (`bench.pipeline`), video decoders (`bench.decode`) and a
needle-in-a-haystack test (`bench.needle`). Each runs as `python -m bench.<name> --help` from the repository root."""
