"""fastsd's fused loss inside other trainers.

trl.py   TRL's self-distillation (SDPO, SDFT) and GKD trainers: `use_fastsd_loss(trainer)`
"""
