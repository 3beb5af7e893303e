"""The lab: the seed experiments as declarative specs, run by one engine (`pgtrace lab`)."""
