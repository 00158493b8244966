"""Registers the ``slow`` marker if the project configuration does not (so ``pytest -m "not slow"``
works either way)."""


def pytest_configure(config):
    registered = config.getini("markers")
    if not any(line.split(":")[0].strip() == "slow" for line in registered):
        config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with "
                                "-m \"not slow\")")
