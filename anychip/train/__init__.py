"""Training: the loop (loop.py) over one step's gradients (step.py) for an objective
(lm.py here, anychip.rl.policy for GRPO), built by build.py, ended by finish.py."""
