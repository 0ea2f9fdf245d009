"""OpenAI semantics without FastAPI: requests -> engine requests -> responses/chunks."""
