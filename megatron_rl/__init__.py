"""megatron-rl: Kimi k1.5-style reinforcement learning of LLMs on megatron-core."""
