"""Real config.json files of the hub models, for random-init twins of their exact architecture (see README.md)."""
