"""Tests of the HTTP edge (not named tests/http: that package would shadow the stdlib http)."""
