"""The engine: admission, scheduling and the model worker (no FastAPI here)."""
