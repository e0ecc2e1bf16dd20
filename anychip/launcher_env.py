"""The environment variables ``anychip train``'s launcher sets for the workers it starts
(read by ``anychip.launch`` and ``anychip.train.preempt``; no imports, so both can)."""

LAUNCHER_PID = "ANYCHIP_LAUNCHER_PID"  # the launcher's pid: it owns SIGTERM and the run directory's lock
PREEMPTED = "ANYCHIP_PREEMPTED"  # set once preempted: a worker started after it stops at once
ATTEMPT = "ANYCHIP_ATTEMPT"  # starts of every worker of the job (the store's prefix; else torchrun's restart count)
GENERATION = "ANYCHIP_GENERATION"  # the generation a worker started alone joins (its peers restart in place)
POOL = "ANYCHIP_POOL"  # the index of the pool this job is (a run of several pools: anychip/pools)
POOL_ATTEMPT = "ANYCHIP_POOL_ATTEMPT"  # how many times the pool was started before (0: the run's first start)
SNAPSHOT_JOB = "ANYCHIP_SNAPSHOT_JOB"  # the job's random id: names its snapshots in shared memory (anychip/snapshot.py)
