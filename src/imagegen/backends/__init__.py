"""Backends: the engines behind the API. See base.py for the interface."""
