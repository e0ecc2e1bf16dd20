"""Reinforcement learning with verifiable rewards: GRPO, Dr. GRPO, DAPO and GSPO losses
(losses.py), reward components (rewards.py), and the rollout data source and policy step
that plug into the training loop when ``train.mode = "grpo"`` (grpo.py)."""
