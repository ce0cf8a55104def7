"""The chat family: a chat job streams a completion from an OpenAI-compatible server, publishing its frames
as they come and storing the answer with its session.

actors.py       chat_completion
completion.py   the job: history, the provider stream, frames, the stored answer, failures
tokens.py       token counting and the context budget (history trimmed to fit)

The frames' transport (fleet.shared.frames) and the HTTP client (fleet.shared.providers.chat) are platform:
the SDK and the gateway listen to frames too."""

from fleet.workers import actors_of

__getattr__ = actors_of(__name__, {"chat_completion": "actors"})
