"""Thin APIRouters: parse -> call the handler -> JSON | SSE."""
