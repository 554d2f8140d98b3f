"""OpenAI-compatible HTTP serving over the engine: ``create_app(llm, model_name, api_key)``.

Needs the optional ``serve`` extra (fastapi, uvicorn).
"""

from shadowkv.server.app import create_app
from shadowkv.server.worker import EngineWorker

__all__ = ["EngineWorker", "create_app"]
