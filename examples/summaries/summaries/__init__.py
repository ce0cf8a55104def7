"""An application with a job type of its own on the fleet: `summarize` reads a stored document, asks the
chat provider for a summary and stores it. See ../README.md."""
