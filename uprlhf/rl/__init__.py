"""Policy optimisation (Step 3): PPO maths, policy, learner, rollout, scoring, weight sync, penalties, alarm, best-of-n, replay."""
