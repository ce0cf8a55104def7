"""The embed family: documents (inline, or rows of a registered source) chunked, embedded in provider-sized
batches and upserted into pgvector tables, skipping what is unchanged.

actors.py      embed_documents
embedding.py   sources, chunking, the batches, the upsert and search

The HTTP client (fleet.shared.providers.embeddings) and pgvector helpers (fleet.shared.vectors) are platform."""

from fleet.workers import actors_of

__getattr__ = actors_of(__name__, {"embed_documents": "actors"})
