"""Analysis of benchmark results: load run records and build leaderboards.

Run ``python -m analysis leaderboard`` after ``python -m bench`` has written
records under ``results/runs/<run_id>/record.json``.
"""
