"""Tools run from a checkout, not installed. A package so that `scripts.bench`
(the benchmark) can be imported from the repository root."""
