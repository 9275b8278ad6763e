"""The daemon: the sidecar that supervises the workers of one host or pod.

Data flows one way. The loop (loop.py) reads the agents' datagrams (inbox.py) and ticks;
the supervisor (supervisor.py) folds what arrives into the state (state.py), samples memory
through the one OS seam (procs.py, sampler.py), asks the pure policy (policy.py) for
decisions on a frozen snapshot (snapshot.py, decision.py), has them carried out (actions.py),
publishes the files the agents read (publisher.py) and a view (view.py) that the metrics
(metrics.py) and the HTTP endpoints (http.py, status.py) show. The leak trend of each child
(leak_trend.py) and the growth of each task name (task_growth.py) are pure; so are the
config (config.py, units.py) and the readings (readings.py).
"""
