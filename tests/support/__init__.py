"""Test support: real ComfyUI runtime (runtime.py), tiny seeded models (tiny_models.py), a real
ComfyUI server on loopback (server.py). Import as ``support.*`` (tests/ is on sys.path via
tests/conftest.py); never as ``tests.support``: ComfyUI's own tree has a ``tests`` package that
shadows ours once ComfyUI is on sys.path."""
