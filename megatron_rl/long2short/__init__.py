"""k1.5's long2short methods (paper §2.4): model merging, shortest rejection sampling, DPO pairs.

The trainers they feed are train/sft.py and train/dpo.py; long2short RL is a config preset
(megatron_rl/examples/long2short-rl.yaml) of the ordinary RL run.
"""
