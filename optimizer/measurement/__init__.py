"""How one config is measured: the level record, the generators (built-in, perf_analyzer, replay), the sweep."""
