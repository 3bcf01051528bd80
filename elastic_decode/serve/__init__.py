"""`python -m elastic_decode.serve`: the engine behind an OpenAI-compatible HTTP server (FastAPI +
uvicorn; `pip install 'elastic_decode[serve]'`). See docs/serving.md."""
