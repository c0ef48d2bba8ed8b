"""expertplane.worker: the reference worker process (one rank of the synthetic MoE model).

- :mod:`process`: :func:`~expertplane.worker.process.run_worker` and
  :class:`~expertplane.worker.process.WorkerConfig`, the step loop of one rank.
- :mod:`service`: the node-local ``WorkerService`` (counter pulls, prepare/commit/abort of a plan,
  router bias) and :class:`~expertplane.worker.service.CounterLedger`.
- :mod:`synthetic`: the synthetic MoE model and its drifting Zipf token stream.

The layer code it runs (routing, dispatch, experts, hot-swap) is :mod:`expertplane.kernels`.
"""
