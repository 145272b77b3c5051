"""Chat history storage."""
