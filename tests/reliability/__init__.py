# A package, so that this directory's conftest.py and test modules are
# imported as reliability.* and never shadow tests/conftest.py ("conftest"),
# which the other test modules import from.
