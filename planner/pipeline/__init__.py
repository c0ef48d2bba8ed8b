"""Pipeline-parallel planning: schedule simulation (1F1B, ZB1P, DualPipe, DualPipeV) and
partitioning a model's layers into contiguous stages for the fastest simulated step.

Main entry points: ``simulate``, ``partition``, ``evaluate``, ``load_profile``.
"""

from expertplane.planner.pipeline.baselines import balanced_boundaries, even_boundaries
from expertplane.planner.pipeline.partition import (DEFAULT_NODE_LIMIT, MemoryLimitError,
                                                    PipelinePlan, evaluate, partition)
from expertplane.planner.pipeline.profile import (Layer, Profile, load_profile,
                                                  profile_from_layers, shipped_profiles)
from expertplane.planner.pipeline.schedules import SCHEDULES
from expertplane.planner.pipeline.simulate import Event, SimulationResult, simulate

__all__ = ["DEFAULT_NODE_LIMIT", "Event", "Layer", "MemoryLimitError", "PipelinePlan", "Profile",
           "SCHEDULES", "SimulationResult", "balanced_boundaries", "evaluate", "even_boundaries",
           "load_profile", "partition", "profile_from_layers", "shipped_profiles", "simulate"]
