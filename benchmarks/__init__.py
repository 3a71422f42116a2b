"""sdlite benchmarks: `python -m benchmarks.run --help`."""
