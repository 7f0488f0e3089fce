"""Shared helper of the test-only stand-ins (see README.md)."""


def unavailable(name: str):
    def stand_in(*args, **kwargs):
        raise RuntimeError(f"{name} is a test-only stand-in (tests/openrlhf_stubs): the real GPU package is not "
                           f"installed here")

    stand_in.__name__ = name.rsplit(".", 1)[-1]
    return stand_in
