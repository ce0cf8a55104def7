"""The HTTP gateway (`fleet gateway`): chat and embed jobs over HTTP, their frames as Server-Sent Events."""
