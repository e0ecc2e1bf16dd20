"""Pools: one run over several fleets that survives losing one (torchft's Manager and lighthouse).

sync.py      one pool's side: the quorum, the averaging, the state a returning pool takes
launch.py    `anychip train --pools K`: a lighthouse and K pools on this machine
timeline.py  which pool computed which steps, and the time without one (goodput, report)
"""
