"""Tools over the engine: routing traces and cache profiling."""
