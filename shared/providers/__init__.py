"""Clients for the HTTP providers the actors call (OpenAI-compatible embeddings and chat, Letta)."""
