"""llmgine_ws."""
