"""`tulu serve`: OpenAI- and TGI-compatible HTTP APIs over the engine (FastAPI + uvicorn)."""
