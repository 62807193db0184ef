"""What the tests share: configs, launcher processes, fake clocks, reference models and the
emulators. Plain modules, imported by the tests and by tests/conftest.py's fixtures; no test
file imports another."""
