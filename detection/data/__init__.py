"""Detection data: datasets (COCO, the synthetic shapes set), the mapper that feeds the model, samplers."""
