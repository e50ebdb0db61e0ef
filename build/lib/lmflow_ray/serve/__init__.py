"""Serving on Ray Serve: the OpenAI API (openai_api.py, front.py), engines, the app builders."""
