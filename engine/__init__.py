"""SD1.5 + ControlNet inference engine. `from engine import Runner`.

Imports are lazy so `python -m engine.<cli> --help` and `import engine` stay fast and side-effect free.
"""

__all__ = ["Runner", "GenerationResult"]


def __getattr__(name):
    if name in __all__:
        from engine import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
