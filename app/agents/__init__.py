"""Agent activities: what agents report and how it reaches the log."""
