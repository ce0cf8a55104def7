"""Operator tools: the `fleet` command line (cli/), the demo, embedded worker processes and the queries
they share (queries.py). May import anything; neither the platform nor a family imports them."""
