"""Building blocks shared by methods: losses, fusion and self-distillation modules."""
