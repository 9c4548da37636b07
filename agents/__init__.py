"""The RL track: Meta-World task sets, scripted-policy datasets, the Decision Transformer, pretraining on
MT40, fine-tuning trials on CW10 and parallel rollout evaluation (EVA section 4.5 / appendix E)."""
