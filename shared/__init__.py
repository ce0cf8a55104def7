"""The library the fleet's actors use: config, db, brokers, events, metrics, providers, CLI."""
