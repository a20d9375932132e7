"""Stage 6: forecasts of every run against the real follow-up and the baselines, their metrics, and forecasts for
new patients."""
