"""The memory lifecycle family: expire, archive, decay, evict, merge, re-embed and purge agents' memories,
in bounded batches, with every change recorded so that a run can be undone.

actors.py    memory_lifecycle, embed_memories
actions.py   the actions, a run, and its undo"""

from fleet.workers import actors_of

__getattr__ = actors_of(__name__, {"memory_lifecycle": "actors", "embed_memories": "actors"})
