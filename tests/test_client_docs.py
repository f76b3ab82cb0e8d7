"""Every Python block of ``docs/python-client.md`` runs, unchanged, against the example app it names.

The blocks are complete programs written for ``ws://127.0.0.1:8000/api/ws`` (the example app's
default address): each one runs in a worker thread with its own event loop (``anyio.run`` at its
end), against the example app served on an ephemeral port that replaces ``127.0.0.1:8000``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from llmgine_ws import APIConfig

from .support import serve
from .test_examples import load_example

pytestmark = pytest.mark.anyio

PAGE = Path(__file__).resolve().parent.parent / "docs" / "python-client.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_page_has_runnable_blocks() -> None:
    assert len(BLOCKS) >= 6
    for block in BLOCKS:
        assert "127.0.0.1:8000" in block and "anyio.run(main" in block, block[:200]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
async def test_the_block_runs(index: int) -> None:
    example = load_example("custom_engine_example")
    async with serve(example.build_app(APIConfig(ping_interval=0))) as server:
        source = BLOCKS[index].replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
        code = compile(source, f"{PAGE.name}, python block {index + 1}", "exec")
        output = io.StringIO()

        def run() -> None:
            with contextlib.redirect_stdout(output):
                exec(code, {"__name__": "__main__"})

        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(run)
    assert output.getvalue().strip(), "the block printed nothing"
