"""``expertplane demo``: controller, agents and workers on one machine, balancing live."""
