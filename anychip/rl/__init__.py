"""Reinforcement learning with verifiable rewards: GRPO, Dr. GRPO, DAPO and GSPO losses
(losses.py), reward components (rewards.py), the rollout data source (grpo.py) and the
policy loss as a training Objective (policy.py), which plug into the training loop when
``train.mode = "grpo"``."""
