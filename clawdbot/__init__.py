"""Clawdbot: an authenticating, OpenAI-speaking gateway in front of Ollama."""

__version__ = "0.1.0"
