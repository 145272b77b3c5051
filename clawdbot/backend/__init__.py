"""The model backend: Ollama's client and the pure translation to and from its API."""
