"""The default app: ``uvicorn llmgine_ws.main:app`` (configured from ``LLMGINE_API_*`` variables)."""

from .app import create_app

app = create_app()
