"""zojax: memory-lean training and fine-tuning in JAX (ZO/MeZO, ZO2, DistZO2, GaLore)."""

__version__ = "0.1.0"
