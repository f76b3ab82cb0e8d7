"""``python -m llmgine_ws``: see :mod:`llmgine_ws.cli`."""

import sys

from .cli import main

sys.exit(main())
