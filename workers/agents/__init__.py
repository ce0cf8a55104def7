"""The agents family: Letta agents created from versioned templates, and cohort upgrades of the agents of
a template to a new version.

actors.py           create_agent
upgrade_actors.py   upgrade_fanout, upgrade_agent, requeue_stale_upgrades
creation.py         the create body an agent gets from its template
templates.py        publish, list, diff and export templates (Agent Files)
agentfile.py        parsing and checking an Agent File
agentview.py        what a template owns of an agent, and the PATCH that brings an agent to it
semver.py           template versions
upgrades.py         upgrade runs: cohorts, fan-out, one agent's upgrade, stale attempts

The Letta HTTP client (fleet.shared.providers.letta) is platform."""

from fleet.workers import actors_of

__getattr__ = actors_of(
    __name__,
    {
        "create_agent": "actors",
        "upgrade_fanout": "upgrade_actors",
        "upgrade_agent": "upgrade_actors",
        "requeue_stale_upgrades": "upgrade_actors",
    },
)
