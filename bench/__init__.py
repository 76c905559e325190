"""Benchmarks, run from the repo root as modules (`python -m bench.run_all`): the project's modules and the
bench helpers (`from bench import results_file`) are then imported from the root, and bench/memory_plan.py
never shadows the project's memory_plan.py."""
