"""Benchmarks behind ``atlas-rl bench``: an application on top of the engine, never imported by it."""
