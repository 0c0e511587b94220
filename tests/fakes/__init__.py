"""Fakes of the internet's edge (YouTube, web sites) for tests; nothing of our own."""
