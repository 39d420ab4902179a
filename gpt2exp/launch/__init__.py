"""Launchers: from a spec to a plan of jobs, run locally (or under torchrun) or on Ray Train."""
