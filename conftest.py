import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the learning test and whole command-line runs; the fast tier is "
                                       "python -m pytest -m \"not slow\"")
